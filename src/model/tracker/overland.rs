//! Overland: batches of GeoJSON Features. The app deletes a batch only when the answer is `{"result":"ok"}` and
//! resends the whole batch otherwise, so a batch is taken or refused whole, and a resend is absorbed by the
//! natural key.
//!
//! Followed: aaronpk/Overland-iOS `README.md` (the body, `coordinates` as `[lon, lat]`, speed in m/s, a negative
//! speed or course meaning unknown, `battery_level` 0–1, the answer) and its `LocationManager` (a `current`
//! location repeats the newest fix, so it is never stored apart).

use serde_json::{Map, Value};

use super::{device_id, RawFields, TrackerError, TrackerFix, TrackerRequest, TrackerRequestOutcome, KMH_PER_MPS};

const NO_DEVICE: &str = "set a Device ID in the app's settings, or add ?device_id=<device> to the URL";

pub fn parse(request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, TrackerError> {
    let mut value: Value =
        serde_json::from_slice(request.body).map_err(|e| TrackerError::InvalidJson(e.to_string()))?;
    // Taken out of the body, so that each fix's raw Feature is moved into it, not copied.
    let Some(Value::Array(locations)) = value.get_mut("locations").map(Value::take) else {
        return Err(TrackerError::NotTheProtocol(
            "an Overland body is {\"locations\": [GeoJSON Feature, …]}".into(),
        ));
    };
    if locations.len() > request.max_fixes {
        return Err(TrackerError::TooManyFixes {
            limit: request.max_fixes,
        });
    }
    // A device id in the URL stands in for a blank one in the app's settings (its default).
    let from_url: Option<String> = super::form_fields(request.query.as_bytes())
        .find(|(k, _)| k == "device_id")
        .map(|(_, v)| v);
    let mut outcome = TrackerRequestOutcome::default();
    for feature in locations {
        let named = feature
            .get("properties")
            .and_then(|p| p.get("device_id"))
            .and_then(Value::as_str);
        let Some((coordinates, properties)) = as_fix(&feature) else {
            // Not stored, but a batch that names a device no key could write is refused as a fix's would be.
            if named.is_some_and(|n| !n.trim().is_empty()) {
                device_id(&[named, from_url.as_deref(), request.basic_user], NO_DEVICE)?;
            }
            outcome.ignored.push("not_a_fix");
            continue;
        };
        let device = device_id(&[named, from_url.as_deref(), request.basic_user], NO_DEVICE)?;
        let mut fix = fix(device, coordinates, properties);
        fix.raw = RawFields::Json(feature);
        outcome.fixes.push(fix);
    }
    Ok(outcome)
}

/// The coordinates and properties of a Feature that is a location fix: a Point without an `action` (a visit or
/// another event) or a `type` (the trip summary `GLManager.m`'s `writeTripToDB` queues at a trip's end).
fn as_fix(feature: &Value) -> Option<(&Vec<Value>, &Map<String, Value>)> {
    let geometry = feature.get("geometry")?;
    if geometry.get("type").and_then(Value::as_str) != Some("Point") {
        return None;
    }
    let coordinates = geometry.get("coordinates")?.as_array()?;
    let properties = feature.get("properties")?.as_object()?;
    if properties.contains_key("action") || properties.contains_key("type") {
        return None;
    }
    Some((coordinates, properties))
}

fn fix(device: String, coordinates: &[Value], properties: &Map<String, Value>) -> TrackerFix {
    let mut fix = TrackerFix::new(device, Value::Null);
    match coordinates {
        [lon, lat, ..] => {
            fix.lon = fix.number("coordinates[0]", lon);
            fix.lat = fix.number("coordinates[1]", lat);
        }
        _ => fix.unreadable("coordinates", "must be [longitude, latitude]"),
    }
    if !properties.contains_key("timestamp") {
        fix.unreadable("timestamp", "is required");
    }
    for (name, value) in properties {
        match name.as_str() {
            "device_id" => {}
            "timestamp" => fix.recorded_at = fix.time(name, value),
            "speed" => fix.speed_kmh = fix.known(name, value).map(|mps| mps * KMH_PER_MPS),
            "course" => fix.heading_deg = fix.known(name, value),
            "horizontal_accuracy" => fix.accuracy_m = fix.known(name, value),
            "altitude" => {
                if let Some(n) = fix.number(name, value) {
                    fix.attribute("altitude", n.into());
                }
            }
            "battery_level" => {
                if let Some(level) = fix.known(name, value) {
                    fix.attribute("batt", (level * 100.0).round().into());
                }
            }
            _ => fix.attribute(name, value.clone()),
        }
    }
    fix
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// The example of aaronpk/Overland-iOS `README.md`.
    const README: &str = r#"{
      "locations": [
        {
          "type": "Feature",
          "geometry": {"type": "Point", "coordinates": [-122.030581, 37.331800]},
          "properties": {
            "timestamp": "2015-10-01T08:00:00-0700",
            "altitude": 0, "speed": 4, "horizontal_accuracy": 30, "vertical_accuracy": -1,
            "motion": ["driving","stationary"], "pauses": false, "activity": "other_navigation",
            "desired_accuracy": 100, "deferred": 1000, "significant_change": "disabled",
            "locations_in_payload": 1, "battery_state": "charging", "battery_level": 0.89,
            "device_id": "", "wifi": ""
          }
        }
      ]
    }"#;

    fn parse_with(body: &str, query: &str) -> Result<TrackerRequestOutcome, TrackerError> {
        parse(&TrackerRequest {
            body: body.as_bytes(),
            query,
            json: true,
            max_fixes: 1000,
            ..TrackerRequest::default()
        })
    }

    #[test]
    fn the_readme_example_maps_geojson_order_metres_per_second_and_battery_level() {
        let out = parse_with(README, "device_id=iphone").unwrap();
        let fix = &out.fixes[0];
        assert_eq!(fix.device_id, "iphone");
        assert_eq!((fix.lat, fix.lon), (Some(37.3318), Some(-122.030581)));
        assert_eq!(fix.recorded_at, Some(datetime!(2015-10-01 15:00 UTC)));
        assert!((fix.speed_kmh.unwrap() - 14.4).abs() < 1e-9);
        assert_eq!(fix.accuracy_m, Some(30.0));
        assert_eq!(fix.attributes["batt"], serde_json::json!(89.0));
        assert_eq!(fix.attributes["motion"], serde_json::json!(["driving", "stationary"]));
    }

    #[test]
    fn a_blank_device_id_without_one_in_the_url_refuses_the_batch() {
        assert!(matches!(parse_with(README, ""), Err(TrackerError::NoDevice(_))));
    }

    #[test]
    fn features_that_are_not_fixes_are_skipped_and_counted() {
        let body = r#"{"locations":[
            {"type":"Feature","geometry":{"type":"Point","coordinates":[1,2]},"properties":{"action":"visit","device_id":"a"}},
            {"type":"Feature","geometry":{"type":"LineString","coordinates":[[1,2],[3,4]]},"properties":{}},
            {"type":"Feature","geometry":{"type":"Point","coordinates":[1,2]},"properties":{"timestamp":"2026-01-01T00:00:00Z","device_id":"a","speed":-1,"course":-1}}
        ],"current":{"type":"Feature"}}"#;
        let out = parse_with(body, "").unwrap();
        assert_eq!(out.ignored, ["not_a_fix", "not_a_fix"]);
        assert_eq!(out.fixes.len(), 1);
        assert_eq!((out.fixes[0].speed_kmh, out.fixes[0].heading_deg), (None, None));
    }
}
