//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of the HTTP API. It is generated from the handlers'
//! `#[utoipa::path]` attributes and from the types their bodies are made of (the request schemas from the
//! ranges the validators check, the error responses from the error enum), so it changes with the code.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::json;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref};
use utoipa::{Modify, OpenApi, ToSchema};

use super::errors::ErrorBody;
use super::{health, ingest, stats, status, trackers};

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";

/// The document: every route, with its parameters, bodies and answers.
#[derive(OpenApi)]
#[openapi(
    info(description = "Takes high rates of small JSON updates over HTTP (GPS fixes, poll results), makes them \
        durable and writes them into PostgreSQL in batches. Every error body is `{\"error\", \"message\", \
        \"details\"}`. A path not listed here answers 404 (`NotFound`); a listed path asked with another method \
        answers 405 (`MethodNotAllowed`)."),
    paths(
        ingest::location,
        ingest::poll,
        trackers::osmand,
        trackers::owntracks,
        trackers::overland,
        trackers::traccar,
        stats::stats,
        stats::metrics,
        health::healthz,
        health::readyz,
        status::page,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    modifiers(&UnknownRoutes, &EmptyOwntracksBody),
    tags(
        (name = "ingest", description = "Updates in"),
        (name = "trackers", description = "GPS trackers' own protocols, answered as each client expects"),
        (name = "operations", description = "What operators and load balancers read"),
    ),
)]
pub struct ApiDoc;

/// OwnTracks posts zero-length bodies too (its booklet says to ignore them), and they are answered as any other
/// message: its body is optional, which the path attribute cannot say of a body with a schema.
struct EmptyOwntracksBody;

impl Modify for EmptyOwntracksBody {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let body = openapi
            .paths
            .paths
            .get_mut("/api/v1/owntracks")
            .and_then(|item| item.post.as_mut())
            .and_then(|operation| operation.request_body.as_mut());
        if let Some(body) = body {
            body.required = Some(utoipa::openapi::Required::False);
        }
    }
}

/// Adds what the gateway answers outside the listed operations, as reusable responses: OpenAPI has no place
/// for an unknown path or method, so they are named here for clients to read.
struct UnknownRoutes;

impl Modify for UnknownRoutes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let not_found = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(ErrorBody::name())))
            .example(Some(
                json!({"error": "not_found", "message": "no such route", "details": []}),
            ))
            .build();
        components.responses.insert(
            "NotFound".to_owned(),
            ResponseBuilder::new()
                .description("No route has this path")
                .content("application/json", not_found)
                .build()
                .into(),
        );
        let methods = ObjectBuilder::new().schema_type(Type::String);
        let allow = HeaderBuilder::new()
            .schema(methods)
            .description(Some("The methods the path takes"))
            .build();
        components.responses.insert(
            "MethodNotAllowed".to_owned(),
            ResponseBuilder::new()
                .description("The path exists, not with this method; no body")
                .header("Allow", allow)
                .build()
                .into(),
        );
    }
}

/// The OpenAPI 3.1 document of this API (this document).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "get_openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    // Built once: it depends on nothing but the code.
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    HttpResponse::Ok().json(DOCUMENT.get_or_init(ApiDoc::openapi))
}
