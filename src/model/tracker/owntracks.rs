//! OwnTracks in HTTP mode: one JSON message per POST. Only `_type=location` is a fix; every other type (`lwt`,
//! `transition`, `waypoint`, `card`, `cmd`, `encrypted`, …) and an empty body are answered and not stored.
//!
//! Followed: owntracks/booklet `docs/tech/json.md` and `docs/tech/http.md` (fields and units: `tst` in seconds,
//! `vel` in km/h; "zero-length bodies … should be ignored"), owntracks/android `HttpMessageProcessorEndpoint.kt`
//! (the `X-Limit-U`/`X-Limit-D` headers) and traccar/traccar `OwnTracksProtocolDecoder.java` (identity from
//! `topic`, else `tid`).

use serde_json::Value;

use super::{device_id, RawFields, TrackerError, TrackerFix, TrackerRequest, TrackerRequestOutcome};

const NO_DEVICE: &str = "set a username and device id in the app (X-Limit-U / X-Limit-D), or send `topic` or `tid`";

/// The message types OwnTracks sends, as counted when they are not stored; anything else is `other`.
pub const MESSAGE_TYPES: [&str; 10] = [
    "empty",
    "lwt",
    "transition",
    "waypoint",
    "waypoints",
    "card",
    "cmd",
    "steps",
    "encrypted",
    "other",
];

pub fn parse(request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, TrackerError> {
    let body = request.body.trim_ascii();
    if body.is_empty() {
        return Ok(ignored("empty"));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| TrackerError::InvalidJson(e.to_string()))?;
    let Value::Object(message) = value else {
        return Err(TrackerError::NotTheProtocol(
            "an OwnTracks message is one JSON object".into(),
        ));
    };
    match message.get("_type").and_then(Value::as_str) {
        Some("location") => {}
        Some(kind) => {
            let kind = MESSAGE_TYPES
                .iter()
                .find(|known| **known == kind)
                .copied()
                .unwrap_or("other");
            return Ok(ignored(kind));
        }
        None => return Ok(ignored("other")),
    }
    let device = identity(request, &message)?;
    let mut fix = TrackerFix::new(device, Value::Null);
    for (name, value) in &message {
        match name.as_str() {
            "_type" => {}
            "lat" => fix.lat = fix.number(name, value),
            "lon" => fix.lon = fix.number(name, value),
            "tst" => match fix.number(name, value) {
                Some(seconds) => fix.recorded_at = fix.time(name, &Value::from(seconds)),
                None => fix.unreadable(name, "is required"),
            },
            "vel" => fix.speed_kmh = fix.known(name, value),
            "cog" => fix.heading_deg = fix.known(name, value),
            "acc" => fix.accuracy_m = fix.number(name, value),
            "alt" => {
                if let Some(n) = fix.number(name, value) {
                    fix.attribute("altitude", n.into());
                }
            }
            _ => fix.attribute(name, value.clone()),
        }
    }
    if !message.contains_key("tst") {
        fix.unreadable("tst", "is required");
    }
    fix.raw = RawFields::Json(Value::Object(message));
    Ok(TrackerRequestOutcome {
        fixes: vec![fix],
        ignored: Vec::new(),
    })
}

fn ignored(kind: &'static str) -> TrackerRequestOutcome {
    TrackerRequestOutcome {
        fixes: Vec::new(),
        ignored: vec![kind],
    }
}

/// `user:device` from the Android app's headers, else the topic's segments after `owntracks/` joined by `:` (the
/// iOS app's `owntracks/user/device`), else the two-letter `tid`.
fn identity(request: &TrackerRequest<'_>, message: &serde_json::Map<String, Value>) -> Result<String, TrackerError> {
    let from_headers = match (request.limit_user, request.limit_device) {
        (Some(user), Some(device)) if !device.trim().is_empty() => Some(format!("{}:{}", user.trim(), device.trim())),
        (Some(user), _) => Some(user.trim().to_owned()),
        _ => None,
    };
    let from_topic = message.get("topic").and_then(Value::as_str).map(|topic| {
        let mut segments = topic.split('/').filter(|s| !s.is_empty());
        let first = segments.next();
        let rest: Vec<&str> = segments.collect();
        if rest.is_empty() {
            first.unwrap_or_default().to_owned()
        } else {
            rest.join(":")
        }
    });
    let tid = message.get("tid").and_then(Value::as_str);
    device_id(
        &[from_headers.as_deref(), from_topic.as_deref(), tid, request.basic_user],
        NO_DEVICE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn parse_with(body: &str, user: Option<&str>, device: Option<&str>) -> TrackerRequestOutcome {
        parse(&TrackerRequest {
            body: body.as_bytes(),
            json: true,
            limit_user: user,
            limit_device: device,
            max_fixes: 1,
            ..TrackerRequest::default()
        })
        .unwrap()
    }

    const BOOKLET: &str = r#"{"_type":"location","tid":"JJ","lat":48.85833,"lon":2.29513,"tst":1497476456,"acc":5,"vel":61,"cog":271,"batt":41,"t":"u","topic":"owntracks/jane/phone"}"#;

    #[test]
    fn the_booklet_location_maps_kmh_seconds_and_the_topic() {
        let fix = &parse_with(BOOKLET, None, None).fixes[0];
        assert_eq!(fix.device_id, "jane:phone");
        assert_eq!(fix.recorded_at, Some(datetime!(2017-06-14 21:40:56 UTC)));
        assert_eq!(
            (fix.speed_kmh, fix.heading_deg, fix.accuracy_m),
            (Some(61.0), Some(271.0), Some(5.0))
        );
        assert_eq!(fix.attributes["batt"], serde_json::json!(41));
        assert!(!fix.attributes.contains_key("_type"));
    }

    #[test]
    fn the_android_headers_name_the_device_before_the_topic() {
        assert_eq!(
            parse_with(BOOKLET, Some("jane"), Some("pixel")).fixes[0].device_id,
            "jane:pixel"
        );
        assert_eq!(
            parse_with(r#"{"_type":"location","tid":"JJ","lat":1,"lon":2,"tst":1}"#, None, None).fixes[0].device_id,
            "JJ"
        );
    }

    #[test]
    fn other_messages_and_empty_bodies_are_answered_and_not_stored() {
        for (body, kind) in [
            ("", "empty"),
            (r#"{"_type":"lwt","tst":1}"#, "lwt"),
            (r#"{"_type":"transition","event":"enter"}"#, "transition"),
            (r#"{"_type":"encrypted","data":"xx"}"#, "encrypted"),
            (r#"{"_type":"status"}"#, "other"),
        ] {
            let out = parse_with(body, None, None);
            assert!(out.fixes.is_empty());
            assert_eq!(out.ignored, [kind]);
        }
    }
}
