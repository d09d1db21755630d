//! API keys at the HTTP door: who may write which stream, and which devices or projects in it; and the rate limits
//! that go with a key or a client address. The keys file itself is read by [`crate::keys_file`].
//!
//! A request names its key with `Authorization: Bearer <key>` or `X-API-Key: <key>`. The key is hashed and the
//! hash looked up among the file's. The file is re-read on SIGHUP. A file that cannot be used at a reload does not
//! leave the previous keys in force — the edit may have been the removal of a leaked key — but refuses every
//! write with 503 (clients keep their updates and retry) until a good file is loaded; the log,
//! `ingest_api_keys_file_usable` and `/readyz` say so.
//!
//! The operator's routes (`/metrics`, `/stats`, the status page, `/readyz`'s reasons) need no key, but when keys
//! are in force and they share a listener other machines can reach, they ask for the admin token
//! (`INGEST_ADMIN_TOKEN_FILE`, sent as a Bearer token): a key holder must not read other tenants' key names and
//! volumes, nor strangers the queue fill that times an attack. `/healthz` stays open.
//!
//! - [`access`]: the keys in force and their reload, the admin token, and `Access`: who may write and how fast.
//! - [`scope`]: whether a key may write a request's stream and each of its updates.

pub mod access;
pub mod scope;

pub use access::{Access, AdminToken, ApiKeys, KeyEntry, OperatorAccess};
pub use scope::Scoped;
