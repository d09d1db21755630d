//! The `imeis=` field of the API keys file: the hardware units a key lets connect over TCP, by the id they give
//! at their handshake (a Teltonika unit's IMEI), as an exact list.
//!
//! ```text
//! # name     hash of the key           what it may write
//! trucks     sha256:<64 hex digits>    streams=location imeis=356307042441013,356307042441014
//! ```
//!
//! Binary trackers carry no key: with API keys in force, a unit is let in only when a key's line names its IMEI,
//! and the key must be one that may write location updates. An IMEI may be named by one line only, so that
//! which key a unit writes under is never in doubt. The list is the grant: it does not depend on the key's
//! `devices=` scope, which bounds what the key's HTTP requests write.
//!
//! The line parser ([`super::parse_keys`]) reads the other fields, and leaves this one out ([`without_imeis`]);
//! this module reads it from the same text, with the same rules for comments and line numbers.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::model::location::is_valid_device_id;

/// The field's name in a keys-file line.
pub const FIELD: &str = "imeis";

/// A line's content without its `imeis=` field, for the parser of the other fields.
pub fn without_imeis(content: &str) -> Cow<'_, str> {
    if !content.split_whitespace().any(is_imeis_token) {
        return Cow::Borrowed(content);
    }
    let kept: Vec<&str> = content.split_whitespace().filter(|t| !is_imeis_token(t)).collect();
    Cow::Owned(kept.join(" "))
}

fn is_imeis_token(token: &str) -> bool {
    token.split_once('=').is_some_and(|(field, _)| field == FIELD)
}

/// Which key lets each unit in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImeiList {
    /// The IMEI, then the name of the key whose line names it.
    key_of: HashMap<String, String>,
}

/// A keys file whose `imeis=` fields cannot be used, with the line (1-based) that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImeiListError {
    pub line: usize,
    pub message: String,
}

impl ImeiList {
    /// Reads every `imeis=` field of a keys file; `may_write_location` says whether the key of a name may write
    /// location updates (the rest of each line is the line parser's to check).
    pub fn parse(text: &str, may_write_location: impl Fn(&str) -> bool) -> Result<Self, ImeiListError> {
        let mut list = ImeiList::default();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let fail = |message: String| ImeiListError { line, message };
            // No field may hold `#`, so a comment can start anywhere.
            let content = raw.split('#').next().unwrap_or_default();
            let mut tokens = content.split_whitespace();
            let Some(name) = tokens.next() else { continue };
            let mut fields = tokens.filter(|t| is_imeis_token(t));
            let Some(field) = fields.next() else { continue };
            if fields.next().is_some() {
                return Err(fail(format!("{FIELD}= is given twice")));
            }
            if !may_write_location(name) {
                return Err(fail(format!(
                    "{FIELD}= is given but the key may not write location updates"
                )));
            }
            let value = field.split_once('=').map_or("", |(_, value)| value);
            for imei in value.split(',') {
                if !is_valid_device_id(imei) {
                    return Err(fail(format!(
                        "{imei:?} is not a device id (an IMEI: its digits; 1–64 of A-Z a-z 0-9 . _ : -)"
                    )));
                }
                if let Some(earlier) = first_line.get(imei) {
                    if *earlier != line {
                        return Err(fail(format!("{imei} is already named on line {earlier}")));
                    }
                    continue;
                }
                first_line.insert(imei.to_owned(), line);
                list.key_of.insert(imei.to_owned(), name.to_owned());
            }
        }
        Ok(list)
    }

    /// The name of the key that lets `imei` in, if any.
    pub fn key_of(&self, imei: &str) -> Option<&str> {
        self.key_of.get(imei).map(String::as_str)
    }

    /// How many units the keys let in.
    pub fn len(&self) -> usize {
        self.key_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.key_of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn location_keys(name: &str) -> bool {
        name != "pollers"
    }

    #[test]
    fn a_line_names_its_units_and_the_other_fields_are_left_to_the_line_parser() {
        let line = format!("trucks {HASH} streams=location imeis=356307042441013,356307042441014 rate=5");
        assert_eq!(without_imeis(&line), format!("trucks {HASH} streams=location rate=5"));
        assert!(matches!(without_imeis("fleet x streams=location"), Cow::Borrowed(_)));
        let list = ImeiList::parse(&format!("# units\n{line}  # the depot\n"), location_keys).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.key_of("356307042441014"), Some("trucks"));
        assert_eq!(list.key_of("35630704244101"), None, "exact ids, not prefixes");
    }

    #[test]
    fn every_mistake_names_its_line() {
        let cases = [
            (format!("pollers {HASH} streams=poll imeis=1"), "may not write location"),
            (format!("a {HASH} streams=location imeis=1 imeis=2"), "given twice"),
            (format!("a {HASH} streams=location imeis=1,,2"), "not a device id"),
            (format!("a {HASH} streams=location imeis="), "not a device id"),
            (format!("a {HASH} streams=location imeis=1/2"), "not a device id"),
        ];
        for (line, expected) in cases {
            let error = ImeiList::parse(&format!("\n{line}"), location_keys).unwrap_err();
            assert_eq!(error.line, 2, "{line}");
            assert!(error.message.contains(expected), "{line}: {}", error.message);
        }
        let twice = format!("a {HASH} streams=location imeis=7\nb {HASH} streams=location imeis=8,7");
        let error = ImeiList::parse(&twice, location_keys).unwrap_err();
        assert_eq!(
            (error.line, error.message.as_str()),
            (2, "7 is already named on line 1")
        );
    }

    #[test]
    fn a_file_without_the_field_lets_no_unit_in() {
        let list = ImeiList::parse(&format!("fleet {HASH} streams=location"), location_keys).unwrap();
        assert!(list.is_empty());
    }
}
