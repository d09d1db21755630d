//! The `new-key` command: a new API key from the system's random source, and the keys-file line that grants it.

use crate::config::NewKeyArgs;
use crate::keys_file::{hashed, parse_line, KEY_PREFIX};
use crate::support::random;

/// Random bytes in a key: 256 bits, beyond any guessing.
const KEY_BYTES: usize = 32;

/// A key made by `ingest-gateway new-key`: the key, shown once, and its line for the keys file.
pub struct NewKey {
    pub key: String,
    pub line: String,
}

/// Makes a key from the system's random source and the keys-file line that grants it `args`.
pub fn new_key(args: &NewKeyArgs) -> anyhow::Result<NewKey> {
    let key = format!("{KEY_PREFIX}{}", random::hex::<KEY_BYTES>()?);
    let mut line = format!("{} {} streams={}", args.name, hashed(&key), args.streams.join(","));
    if !args.devices.is_empty() {
        line += &format!(" device={}", args.devices.join(","));
    }
    if !args.device_prefixes.is_empty() {
        line += &format!(" devices={}", args.device_prefixes.join(","));
    }
    if let Some(projects) = &args.projects {
        line += &format!(" projects={projects}");
    }
    if let Some(rate) = &args.rate {
        line += &format!(" rate={rate}");
    }
    // The line is read back as the gateway will read it, so that a mistake shows now, not at the next reload.
    parse_line(&line).map_err(|message| anyhow::anyhow!("{message}"))?;
    Ok(NewKey { key, line })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::Scoped;
    use crate::keys_file::{hash_key, parse_keys, ApiKey, KeyFileError};
    use crate::model::LocationUpdate;

    fn one(line: &str) -> Result<ApiKey, KeyFileError> {
        parse_keys(line).map(|mut keys| keys.remove(0))
    }

    fn location(device_id: &str) -> LocationUpdate {
        LocationUpdate::at_epoch(device_id)
    }

    #[test]
    fn a_new_key_is_random_and_its_line_holds_its_hash() {
        let args = NewKeyArgs {
            name: "fleet".into(),
            streams: vec!["location".into()],
            devices: vec![],
            device_prefixes: vec!["truck-".into()],
            projects: None,
            rate: Some("10:100".parse().unwrap()),
        };
        let made = new_key(&args).unwrap();
        assert!(made.key.starts_with(KEY_PREFIX));
        assert_eq!(made.key.len(), KEY_PREFIX.len() + 64);
        let key = one(&made.line).unwrap();
        assert_eq!(key.hash, hash_key(made.key.as_bytes()));
        assert_eq!(key.device_prefixes, ["truck-"]);
        assert_ne!(new_key(&args).unwrap().key, made.key);
        assert!(!made.line.contains(&made.key[KEY_PREFIX.len()..]));
    }

    #[test]
    fn a_new_key_with_a_bad_scope_is_refused() {
        let args = NewKeyArgs {
            name: "pollers".into(),
            streams: vec!["poll".into()],
            devices: vec![],
            device_prefixes: vec!["truck-".into()],
            projects: None,
            rate: None,
        };
        let error = new_key(&args).err().unwrap().to_string();
        assert!(error.contains("may not write location"), "{error}");
    }

    #[test]
    fn a_new_key_for_one_device_writes_that_device_only() {
        let args = NewKeyArgs {
            name: "truck-7".into(),
            streams: vec!["location".into()],
            devices: vec!["truck-7".into()],
            device_prefixes: vec![],
            projects: None,
            rate: None,
        };
        let made = new_key(&args).unwrap();
        assert!(made.line.contains(" device=truck-7"), "{}", made.line);
        let key = one(&made.line).unwrap();
        assert_eq!(location("truck-7").outside(&key), None);
        assert!(location("truck-70").outside(&key).is_some());

        let loose = NewKeyArgs {
            devices: vec![],
            device_prefixes: vec!["truck-7".into()],
            ..args
        };
        let error = new_key(&loose).err().unwrap().to_string();
        assert!(error.contains("device=truck-7"), "{error}");
    }
}
