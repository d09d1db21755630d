//! The OpenAPI schemas of the trackers' request bodies. They say what the routes refuse (no device, a body of
//! another shape) and leave the fix's own fields free: a fix that breaks a rule is answered as success and kept
//! in `dead_letters`, so its fields' types are no condition of the answer.

use std::borrow::Cow;

use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use crate::model::location::device_id_schema;

fn open_object(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .additional_properties(Some(AdditionalProperties::FreeForm(true)))
}

/// Declares a unit struct as a named, hand-built schema.
macro_rules! tracker_schema {
    ($name:ident, $build:expr) => {
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                let build: fn() -> Schema = $build;
                build().into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

tracker_schema!(OsmandForm, || {
    open_object(
        "The OsmAnd protocol's fields: `id` (or `deviceid`; GPSLogger `ser`, `aid`), `lat`, `lon` (or \
         `location=lat,lon`), `timestamp`, `speed` (knots), `bearing`, `altitude`, `accuracy`, `hdop`, `batt`, \
         `charge`, `valid`, and any other field, kept in `attributes`",
    )
    .property("id", device_id_schema("The device"))
    .required("id")
    .build()
    .into()
});

tracker_schema!(OsmandJson, || {
    open_object("Traccar Client's JSON: one location (or a list of them) of the transistorsoft shape")
        .property("device_id", device_id_schema("The device"))
        .required("device_id")
        .property(
            "location",
            open_object(
                "`timestamp`, `coords` {latitude, longitude, accuracy, speed (m/s), heading, altitude}, \
                 `battery` {level 0–1, is_charging}, `extras`",
            ),
        )
        .required("location")
        .build()
        .into()
});

tracker_schema!(OwntracksMessage, || {
    open_object(
        "One OwnTracks message. `_type=location` is a fix (`lat`, `lon`, `tst` in seconds, `acc`, `vel` in km/h, \
         `cog`, `alt`, `batt`, …); every other type is answered and not stored. The device is `X-Limit-U` and \
         `X-Limit-D` (`user:device`), else the `topic` after `owntracks/`, else `tid`. An empty body is answered \
         too.",
    )
    .property(
        "_type",
        ObjectBuilder::new().schema_type(Type::String).description(Some(
            "`location`, `lwt`, `transition`, `waypoint`, `card`, `cmd`, `encrypted`, …",
        )),
    )
    .required("_type")
    .property("tid", device_id_schema("The tracker id (two characters in the apps)"))
    .required("tid")
    .build()
    .into()
});

tracker_schema!(OverlandBatch, || {
    let properties = open_object(
        "`timestamp` (ISO 8601), `speed` (m/s, negative: unknown), `course`, `altitude`, `horizontal_accuracy`, \
         `battery_level` (0–1), `device_id` (a blank one is taken from `?device_id=`), and any other field, kept \
         in `attributes`",
    )
    .property("device_id", device_id_schema("The device"))
    .required("device_id");
    let feature = open_object("A GeoJSON Feature: a Point is a fix; a Feature with an `action` (a visit) is not")
        .property(
            "geometry",
            open_object("`{\"type\": \"Point\", \"coordinates\": [lon, lat]}`"),
        )
        .property("properties", properties);
    open_object("An Overland batch, taken or refused whole")
        .property("locations", ArrayBuilder::new().items(feature))
        .required("locations")
        .build()
        .into()
});

tracker_schema!(TraccarForward, || {
    let device = open_object("The device: `uniqueId` is its id; `name` is kept as `device_name`")
        .property("uniqueId", device_id_schema("The device's unique id (an IMEI)"))
        .required("uniqueId");
    open_object("A position a Traccar server forwards (`forward.type=json`)")
        .property(
            "position",
            open_object(
                "`fixTime`, `latitude`, `longitude`, `speed` (knots), `course`, `altitude`, `accuracy`, \
                 `valid`, `attributes`",
            ),
        )
        .required("position")
        .property("device", device)
        .required("device")
        .build()
        .into()
});
