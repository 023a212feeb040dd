//! The OpenAPI description of the HTTP API. It is made from the handlers' `#[utoipa::path]`
//! annotations and the DTOs' schemas by the same call that builds the router (see
//! [`crate::router`]), so a route cannot be served without being described; what is common to
//! every operation (the admin token, problem+json errors) is added here, from the rules the
//! middleware applies.

use axum::{Extension, http::header, response::IntoResponse};
use std::sync::Arc;
use utoipa::{
    OpenApi,
    openapi::{
        self, ContentBuilder, Ref, ResponseBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

use crate::{auth::is_protected, dto, problem::PROBLEM_JSON};

/// The document's fixed parts; the paths come from the router.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "arw-server admin API",
        description = "The HTTP API every node serves. Routes under `/admin`, `/state`, \
            `/events` and `/actions/{id}` need the admin token (`Authorization: Bearer` or \
            `X-ARW-Admin`); `POST /actions` is gated by policy. Every error is \
            `application/problem+json` with a stable `code`."
    ),
    components(schemas(crate::problem::Problem, dto::Handshake, dto::Envelope))
)]
pub struct ApiDoc;

/// Adds the admin token and the error shape to every operation they apply to, once the routes
/// have added theirs.
pub fn complete(mut doc: openapi::OpenApi) -> openapi::OpenApi {
    {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("The node's admin token (also accepted as `X-ARW-Admin`)."))
            .build();
        doc.components
            .get_or_insert_default()
            .add_security_scheme("admin", SecurityScheme::Http(scheme));
        let error = ResponseBuilder::new()
            .description("An RFC 9457 problem with a stable `code`.")
            .content(
                PROBLEM_JSON,
                ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
            )
            .build();
        for (path, item) in doc.paths.paths.iter_mut() {
            let protected = is_protected(path);
            let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .entry("default".to_owned())
                    .or_insert(error.clone().into());
                if protected {
                    let admin = SecurityRequirement::new("admin", Vec::<String>::new());
                    operation.security = Some(vec![admin]);
                }
            }
        }
    }
    doc
}

/// `GET /openapi.json`: this document (public: it describes routes, never data).
#[utoipa::path(get, path = "/openapi.json", tag = "node", responses(
    (status = 200, content_type = "application/json", description = "This OpenAPI document")
))]
pub async fn document(Extension(json): Extension<Arc<str>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json.to_string())
}
