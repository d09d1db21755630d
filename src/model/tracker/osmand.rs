//! The OsmAnd protocol, as Traccar's port 5055 speaks it: Traccar Client (a form POST; the legacy Android app's
//! POST with every field in the query; the 9.x app's JSON), the OsmAnd app's and GPSLogger's templated GET URLs.
//!
//! Followed: traccar/traccar `src/main/java/org/traccar/protocol/OsmAndProtocolDecoder.java` (the query is read
//! first and the body only when the query names nothing; `speed` is in knots; a number below 2^31 is seconds)
//! and mendhak/gpslogger `CustomUrlManager.java` (its placeholders, with speed in m/s, under names the user picks).

use serde_json::Value;

use super::{
    device_id, keep_every_value, typed, RawFields, TrackerError, TrackerFix, TrackerRequest, TrackerRequestOutcome,
    KMH_PER_KNOT, KMH_PER_MPS,
};

/// The query or form field that carries an API key: never mapped, never kept.
pub const KEY_PARAMETER: &str = "key";

const NO_DEVICE: &str = "add id=<device> to the URL or the form (or deviceid, ser, aid)";

/// Reads one OsmAnd request: the fields of the query string, else of the body (a form, or JSON).
pub fn parse(request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, TrackerError> {
    let query = form_pairs(request.query.as_bytes());
    if !query.is_empty() {
        return Ok(one(flat_fix(query, request)?));
    }
    let body = request.body.trim_ascii();
    if body.is_empty() {
        return Err(TrackerError::NoDevice(NO_DEVICE));
    }
    // GPSLogger sends a hand-written body with no content type at all: JSON is known by its first byte.
    if request.json || body.starts_with(b"{") || body.starts_with(b"[") {
        let value: Value = serde_json::from_slice(body).map_err(|e| TrackerError::InvalidJson(e.to_string()))?;
        return json_body(value, request);
    }
    Ok(one(flat_fix(form_pairs(body), request)?))
}

fn one(fix: TrackerFix) -> TrackerRequestOutcome {
    TrackerRequestOutcome {
        fixes: vec![fix],
        ignored: Vec::new(),
    }
}

/// `a=1&b=2` decoded (`+` is a space), without the API key's field, typed as Traccar types them.
fn form_pairs(text: &[u8]) -> Vec<(String, Value)> {
    super::form_fields(text)
        .filter(|(k, _)| k != KEY_PARAMETER && !k.is_empty())
        .map(|(k, v)| (k, Value::String(v)))
        .collect()
}

fn json_body(value: Value, request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, TrackerError> {
    match value {
        // The Traccar Client 9.x body: {"location": {...} or [...], "device_id": "..."}.
        Value::Object(mut top) if top.contains_key("location") => {
            let device = top.remove("device_id");
            let device = device.as_ref().and_then(Value::as_str);
            let locations = match top.remove("location") {
                Some(Value::Array(list)) => list,
                Some(one) => vec![one],
                None => Vec::new(),
            };
            if locations.len() > request.max_fixes {
                return Err(TrackerError::TooManyFixes {
                    limit: request.max_fixes,
                });
            }
            let fixes = locations
                .into_iter()
                .map(|location| client_json_fix(location, device, request))
                .collect::<Result<_, _>>()?;
            Ok(TrackerRequestOutcome {
                fixes,
                ignored: Vec::new(),
            })
        }
        // Flat objects, as the query's fields: one, or a list (the Traccar Client SDK's `uploadJson` mode).
        Value::Object(object) => Ok(one(flat_fix(object.into_iter().collect(), request)?)),
        Value::Array(list) => {
            if list.len() > request.max_fixes {
                return Err(TrackerError::TooManyFixes {
                    limit: request.max_fixes,
                });
            }
            let fixes = list
                .into_iter()
                .map(|item| match item {
                    Value::Object(object) => flat_fix(object.into_iter().collect(), request),
                    _ => Err(TrackerError::NotTheProtocol(
                        "a JSON array must hold objects of OsmAnd fields".into(),
                    )),
                })
                .collect::<Result<_, _>>()?;
            Ok(TrackerRequestOutcome {
                fixes,
                ignored: Vec::new(),
            })
        }
        _ => Err(TrackerError::NotTheProtocol(
            "the JSON body must be an object of OsmAnd fields or Traccar Client's {\"location\": …}".into(),
        )),
    }
}

/// One fix from named fields (a query string, a form, a flat JSON object). Values from text are typed; JSON
/// values are kept as sent.
fn flat_fix(pairs: Vec<(String, Value)>, request: &TrackerRequest<'_>) -> Result<TrackerFix, TrackerError> {
    let text = |names: &[&str]| {
        pairs
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .and_then(|(_, v)| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
    };
    let named = text(&["id", "deviceid"]);
    let gpslogger = text(&["ser", "aid"]);
    let device = device_id(&[named.as_deref(), gpslogger.as_deref(), request.basic_user], NO_DEVICE)?;
    let mut fix = TrackerFix::new(device, Value::Null);
    for (name, value) in &pairs {
        let name = name.as_str();
        match name {
            "id" | "deviceid" => {}
            "lat" | "latitude" => fix.lat = fix.number(name, value),
            "lon" | "lng" | "longitude" => fix.lon = fix.number(name, value),
            "location" => {
                let text = value.as_str().unwrap_or_default();
                match text.split_once(',') {
                    Some((lat, lon)) => {
                        fix.lat = fix.number(name, &Value::String(lat.into()));
                        fix.lon = fix.number(name, &Value::String(lon.into()));
                    }
                    None => fix.unreadable(name, "is not `lat,lon`"),
                }
            }
            "timestamp" | "time" => fix.recorded_at = fix.time(name, value),
            "speed" => fix.speed_kmh = fix.known(name, value).map(|kn| kn * KMH_PER_KNOT),
            // GPSLogger's %SPD, in metres per second.
            "s" | "spd" => fix.speed_kmh = fix.known(name, value).map(|mps| mps * KMH_PER_MPS),
            "bearing" | "heading" | "dir" | "course" => fix.heading_deg = fix.known(name, value),
            "accuracy" | "acc" => fix.accuracy_m = fix.number(name, value),
            "valid" => fix.valid = fix.boolean(name, value).unwrap_or(true),
            "altitude" | "alt" => {
                if let Some(n) = fix.number(name, value) {
                    fix.attribute("altitude", n.into());
                }
            }
            "batt" => {
                if let Some(n) = fix.number(name, value) {
                    fix.attribute("batt", n.into());
                }
            }
            "charge" => {
                if let Some(b) = fix.boolean(name, value) {
                    fix.attribute("charge", Value::Bool(b));
                }
            }
            _ => {
                let value = match value {
                    Value::String(s) => typed(s),
                    other => other.clone(),
                };
                keep_every_value(&mut fix.attributes, name, value);
            }
        }
    }
    fix.raw = RawFields::Pairs(pairs);
    Ok(fix)
}

/// One location of the Traccar Client 9.x body (transistorsoft's `location` object): speed in m/s, battery level
/// 0–1, `-1` for unknown speed and heading.
fn client_json_fix(
    location: Value,
    device: Option<&str>,
    request: &TrackerRequest<'_>,
) -> Result<TrackerFix, TrackerError> {
    let Value::Object(mut location) = location else {
        return Err(TrackerError::NotTheProtocol("`location` must be an object".into()));
    };
    let device = device_id(&[device, request.basic_user], "the body has no `device_id`")?;
    // The query-string copy of the fields, kept for servers that read the body as a form: redundant here.
    location.remove("_");
    let raw = Value::Object(location.clone());
    let mut fix = TrackerFix::new(device, raw);
    if let Some(at) = location.remove("timestamp") {
        fix.recorded_at = fix.time("location.timestamp", &at);
    }
    if let Some(Value::Object(coords)) = location.remove("coords") {
        for (name, value) in coords {
            let field = format!("location.coords.{name}");
            match name.as_str() {
                "latitude" => fix.lat = fix.number(&field, &value),
                "longitude" => fix.lon = fix.number(&field, &value),
                "speed" => fix.speed_kmh = fix.known(&field, &value).map(|mps| mps * KMH_PER_MPS),
                "heading" => fix.heading_deg = fix.known(&field, &value),
                "accuracy" => fix.accuracy_m = fix.number(&field, &value),
                "altitude" => {
                    if let Some(n) = fix.number(&field, &value) {
                        fix.attribute("altitude", n.into());
                    }
                }
                _ => fix.attribute(&name, value),
            }
        }
    }
    if let Some(Value::Object(battery)) = location.remove("battery") {
        if let Some(level) = battery.get("level") {
            if let Some(level) = fix.known("location.battery.level", level) {
                fix.attribute("batt", (level * 100.0).round().into());
            }
        }
        if let Some(Value::Bool(charging)) = battery.get("is_charging") {
            fix.attribute("charge", Value::Bool(*charging));
        }
    }
    if let Some(Value::Object(extras)) = location.remove("extras") {
        for (name, value) in extras {
            fix.attribute(&name, value);
        }
    }
    if let Some(Value::Object(activity)) = location.remove("activity") {
        if let Some(kind) = activity.get("type") {
            fix.attribute("activity", kind.clone());
        }
    }
    for (name, value) in location {
        fix.attribute(&name, value);
    }
    Ok(fix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn request(query: &str, body: &str, json: bool) -> TrackerRequestOutcome {
        parse(&TrackerRequest {
            query,
            body: body.as_bytes(),
            json,
            max_fixes: 100,
            ..TrackerRequest::default()
        })
        .unwrap()
    }

    #[test]
    fn the_query_form_maps_knots_heading_and_unknown_fields() {
        let out = request(
            "id=123456789012345&timestamp=1504763810&lat=60.0&lon=30.0&bearing=7.19&speed=40&ignition=true&rpm=933&fuel=24&key=secret",
            "",
            false,
        );
        let fix = &out.fixes[0];
        assert_eq!(fix.device_id, "123456789012345");
        assert_eq!(fix.recorded_at, Some(datetime!(2017-09-07 05:56:50 UTC)));
        assert_eq!((fix.lat, fix.lon), (Some(60.0), Some(30.0)));
        assert!((fix.speed_kmh.unwrap() - 74.08).abs() < 1e-9);
        assert_eq!(fix.heading_deg, Some(7.19));
        assert_eq!(
            Value::Object(fix.attributes.clone()),
            serde_json::json!({"ignition": true, "rpm": 933, "fuel": 24})
        );
        assert!(!fix.raw.to_json().contains("secret"));
    }

    #[test]
    fn a_form_body_is_read_when_the_query_names_nothing() {
        let out = request(
            "key=k",
            "id=48241179&lat=37.4219983&lon=-122.084&timestamp=1750000000&speed=0.0&bearing=0&batt=87&charge=false",
            false,
        );
        let fix = &out.fixes[0];
        assert_eq!(fix.device_id, "48241179");
        assert_eq!(fix.attributes["batt"], serde_json::json!(87.0));
        assert_eq!(fix.attributes["charge"], serde_json::json!(false));
    }

    #[test]
    fn location_gives_latitude_and_longitude() {
        let fix = &request("id=123456&timestamp=1377177267&location=60.0,30.0", "", false).fixes[0];
        assert_eq!((fix.lat, fix.lon), (Some(60.0), Some(30.0)));
    }

    #[test]
    fn the_traccar_client_json_body_maps_metres_per_second_and_battery_level() {
        let body = r#"{"location":{"timestamp":"2025-06-15T13:45:12.862Z",
            "coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":10,"heading":-1,"altitude":5},
            "is_moving":false,"odometer":0,"event":"motionchange",
            "battery":{"level":0.5,"is_charging":false},"activity":{"type":"still"},"extras":{"trip":"a"},
            "_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp=2025-06-15T13:45:12.862Z&"},
           "device_id":"48241179"}"#;
        let fix = &request("", body, true).fixes[0];
        assert_eq!(fix.device_id, "48241179");
        assert_eq!(fix.speed_kmh, Some(36.0));
        assert_eq!(fix.heading_deg, None);
        assert_eq!(fix.accuracy_m, Some(5.0));
        assert_eq!(fix.attributes["batt"], serde_json::json!(50.0));
        assert_eq!(fix.attributes["activity"], serde_json::json!("still"));
        assert_eq!(fix.attributes["trip"], serde_json::json!("a"));
    }

    #[test]
    fn gpslogger_names_are_aliases_with_speed_in_metres_per_second() {
        let fix = &request(
            "lat=45.5&longitude=-73.25&time=2026-11-22T11%3A59%3A00.000Z&s=10&ser=ABC123&acc=4&dir=90",
            "",
            false,
        )
        .fixes[0];
        assert_eq!(fix.device_id, "ABC123");
        assert_eq!(fix.speed_kmh, Some(36.0));
        assert_eq!(fix.recorded_at, Some(datetime!(2026-11-22 11:59 UTC)));
        assert_eq!((fix.accuracy_m, fix.heading_deg), (Some(4.0), Some(90.0)));
    }

    #[test]
    fn a_request_without_a_device_is_refused_whole() {
        let err = parse(&TrackerRequest {
            query: "lat=1&lon=2",
            max_fixes: 1,
            ..TrackerRequest::default()
        })
        .unwrap_err();
        assert!(matches!(err, TrackerError::NoDevice(_)));
    }
}
