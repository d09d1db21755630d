//! A Traccar server's position forwarding (`forward.type=json`): `{"position": {…}, "device": {…}}` per
//! position. This bridges every binary device protocol Traccar decodes.
//!
//! Followed: traccar/traccar `src/main/java/org/traccar/forward/PositionForwarderJson.java` (the body) and
//! `model/Position.java` (field names; `speed` in knots; `fixTime` ISO 8601; `attributes` a free map).

use serde_json::{Map, Value};

use super::{device_id, RawFields, TrackerError, TrackerFix, TrackerRequest, TrackerRequestOutcome, KMH_PER_KNOT};

const NO_DEVICE: &str = "the body has no `device.uniqueId`";

/// Traccar's own bookkeeping fields of a position: ids of its database and times the gateway keeps itself.
const SKIPPED: [&str; 5] = ["id", "deviceId", "serverTime", "outdated", "geofenceIds"];

pub fn parse(request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, TrackerError> {
    let value: Value = serde_json::from_slice(request.body).map_err(|e| TrackerError::InvalidJson(e.to_string()))?;
    let (Some(Value::Object(position)), device) = (value.get("position"), value.get("device")) else {
        return Err(TrackerError::NotTheProtocol(
            "a Traccar forward body is {\"position\": {…}, \"device\": {…}}".into(),
        ));
    };
    // Traccar writes `uniqueId` as a string, always.
    let unique_id = device.and_then(|d| d.get("uniqueId")).and_then(Value::as_str);
    let device_name = device.and_then(|d| d.get("name")).cloned();
    let device = device_id(&[unique_id, request.basic_user], NO_DEVICE)?;
    let mut fix = TrackerFix::new(device, Value::Null);
    for (name, value) in position {
        match name.as_str() {
            "latitude" => fix.lat = fix.number(name, value),
            "longitude" => fix.lon = fix.number(name, value),
            "fixTime" => fix.recorded_at = fix.time(name, value),
            "speed" => fix.speed_kmh = fix.known(name, value).map(|kn| kn * KMH_PER_KNOT),
            "course" => fix.heading_deg = fix.known(name, value),
            "accuracy" => fix.accuracy_m = fix.known(name, value).filter(|a| *a > 0.0),
            "valid" => fix.valid = fix.boolean(name, value).unwrap_or(true),
            "altitude" => {
                if let Some(n) = fix.number(name, value) {
                    fix.attribute("altitude", n.into());
                }
            }
            "attributes" => {
                if let Value::Object(attributes) = value {
                    merge(&mut fix, attributes);
                }
            }
            _ if SKIPPED.contains(&name.as_str()) => {}
            _ if value.is_null() => {}
            _ => fix.attribute(name, value.clone()),
        }
    }
    if !position.contains_key("fixTime") {
        fix.unreadable("fixTime", "is required");
    }
    if let Some(name) = device_name.filter(|n| !n.is_null()) {
        fix.attribute("device_name", name);
    }
    fix.raw = RawFields::Json(value);
    Ok(TrackerRequestOutcome {
        fixes: vec![fix],
        ignored: Vec::new(),
    })
}

/// Traccar's attributes keep their names (`ignition`, `odometer`, …), but its battery percentage is stored as
/// `batt`, the name every other protocol's battery is stored under.
fn merge(fix: &mut TrackerFix, attributes: &Map<String, Value>) {
    for (name, value) in attributes {
        let name = if name == "batteryLevel" { "batt" } else { name.as_str() };
        fix.attribute(name, value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_forwarded_position_maps_knots_and_keeps_traccar_attributes() {
        let body = r#"{"position":{"id":0,"attributes":{"ignition":true,"batteryLevel":76,"odometer":1200},
            "deviceId":1,"protocol":"teltonika","serverTime":"2026-11-22T11:59:01.000+00:00",
            "deviceTime":"2026-11-22T11:59:00.000+00:00","fixTime":"2026-11-22T11:59:00.000+00:00",
            "outdated":false,"valid":true,"latitude":52.5,"longitude":13.4,"altitude":40.0,"speed":10.0,
            "course":180.0,"address":null,"accuracy":0.0,"network":null,"geofenceIds":null},
            "device":{"id":1,"attributes":{},"groupId":0,"name":"Truck 7","uniqueId":"356307042441013",
            "status":"online","lastUpdate":"2026-11-22T11:59:01.000+00:00","positionId":0,"disabled":false}}"#;
        let out = parse(&TrackerRequest {
            body: body.as_bytes(),
            json: true,
            max_fixes: 1,
            ..TrackerRequest::default()
        })
        .unwrap();
        let fix = &out.fixes[0];
        assert_eq!(fix.device_id, "356307042441013");
        assert_eq!(fix.recorded_at, Some(datetime!(2026-11-22 11:59 UTC)));
        assert!((fix.speed_kmh.unwrap() - 18.52).abs() < 1e-9);
        assert_eq!((fix.heading_deg, fix.accuracy_m), (Some(180.0), None));
        assert_eq!(fix.attributes["batt"], serde_json::json!(76));
        assert_eq!(fix.attributes["protocol"], serde_json::json!("teltonika"));
        assert_eq!(fix.attributes["device_name"], serde_json::json!("Truck 7"));
        assert!(!fix.attributes.contains_key("serverTime"));
    }
}
