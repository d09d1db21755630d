//! `GET /`: the status page for a person — one self-contained HTML file, embedded in the binary, that polls
//! `/stats` every second and draws rates, queues, lag and the last batches (see `status.html`).

use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::HttpResponse;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The page: inline style and script only, so that it works offline and needs no other route.
const PAGE: &str = include_str!("status.html");

/// The page's Content-Security-Policy. Its one inline `<style>` and one `<script>` are allowed by their SHA-256,
/// not by `'unsafe-inline'`: markup injected into the page (inline handlers, `style=""`, another `<script>`)
/// would not run. It may fetch from its own origin only (`/stats`), load nothing else, not be framed, and
/// Trusted Types forbid HTML sinks such as `innerHTML`. Hashed from the page itself, so an edit of the page
/// cannot leave a stale hash behind.
static POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'",
        inline_hashes(PAGE, "script"),
        inline_hashes(PAGE, "style"),
    )
});

/// The status page: live figures for a person, drawn in the browser from `/stats`.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "get_status_page",
    tag = "operations",
    responses((status = 200, description = "A self-contained HTML page (no external assets)", body = String,
        content_type = "text/html")),
)]
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, POLICY.as_str()))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        // The page is small and changes with the binary: always asking costs little and never shows an old one.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(PAGE)
}

/// The CSP source (`'sha256-…'`) of the content of every `<tag>…</tag>` block of `page`, space-separated.
/// The blocks are written without attributes (the tests check it), so the exact opening tag is searched for.
fn inline_hashes(page: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut hashes = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        hashes.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end + close.len()..];
    }
    hashes.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    #[test]
    fn the_page_has_exactly_one_style_and_one_script_block_without_attributes() {
        // Hashes cover a block's content only; an attribute such as `src` or `type` would change what runs.
        assert_eq!(count(PAGE, "<style"), 1);
        assert_eq!(count(PAGE, "<style>"), 1);
        assert_eq!(count(PAGE, "<script"), 1);
        assert_eq!(count(PAGE, "<script>"), 1);
    }

    #[test]
    fn the_page_uses_nothing_the_policy_would_block() {
        // Inline event handlers and style attributes are not covered by the hashes: they would silently not run.
        for forbidden in [
            " style=\"",
            " onclick=",
            " onload=",
            " onerror=",
            "innerHTML",
            "javascript:",
        ] {
            assert!(!PAGE.contains(forbidden), "the page uses {forbidden:?}");
        }
        for external in ["http://", "https://", "//cdn", "@import", "url("] {
            assert!(
                !PAGE.contains(external),
                "the page loads something from elsewhere: {external:?}"
            );
        }
    }

    #[test]
    fn the_policy_allows_the_page_blocks_by_hash_and_nothing_inline_else() {
        let policy = POLICY.as_str();
        assert!(policy.starts_with("default-src 'none';"));
        assert!(!policy.contains("unsafe-inline"));
        assert_eq!(count(policy, "'sha256-"), 2);
        assert_eq!(
            inline_hashes("<script>alert(1)</script>", "script"),
            // echo -n 'alert(1)' | openssl dgst -sha256 -binary | base64
            "'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"
        );
    }
}
