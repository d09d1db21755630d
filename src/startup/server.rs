//! The transports of the start: every listener bound before the gateway runs (HTTP, admin, OsmAnd and the tracker
//! TCP ports), and one actix server per kind of listener.

use std::time::Duration;

use actix_web::{web, HttpServer};
use tracing::info;

use super::https::ServerTls;
use super::listener::{self, Listener};
use super::reload::Reloads;
use super::Role;
use crate::config::Settings;
use crate::http::auth::OperatorAccess;
use crate::http::{self, AppState, Routes};

/// Every listener of the gateway, bound.
pub(super) struct Bound {
    pub listeners: Vec<Listener>,
    pub admin_listeners: Vec<Listener>,
    pub osmand_listeners: Vec<Listener>,
    pub trackers: Option<crate::tcp::TrackerPlan>,
    /// The first TCP port bound (0 when there is none).
    pub port: u16,
}

/// Binds every listener `role` serves; the tracker units' list joins what SIGHUP re-reads.
pub(super) fn bind(settings: &Settings, role: Role, reloads: &Reloads) -> anyhow::Result<Bound> {
    let listeners = listener::open_all(&settings.http.listen, settings.http.socket_mode)?;
    let admin_listeners = match &settings.http.admin_listen {
        Some(list) => listener::open_all(list, settings.http.socket_mode)?,
        None => Vec::new(),
    };
    let osmand_listeners = match (&settings.http.osmand_listen, role) {
        (Some(list), Role::Serve) => listener::open_all(list, settings.http.socket_mode)?,
        _ => Vec::new(),
    };
    let trackers = match role {
        Role::Serve => crate::tcp::TrackerPlan::bind(settings)?,
        Role::Write => None,
    };
    if let Some(units) = trackers.as_ref().and_then(crate::tcp::TrackerPlan::units) {
        reloads.register("tracker units", move || units.reload());
    }
    let port = listeners
        .iter()
        .find_map(|l| match l {
            Listener::Tcp(tcp) => tcp.local_addr().ok().map(|a| a.port()),
            Listener::Unix(_) => None,
        })
        .unwrap_or(0);
    Ok(Bound {
        listeners,
        admin_listeners,
        osmand_listeners,
        trackers,
        port,
    })
}

/// Connections the admin listener keeps open at most.
pub(super) const ADMIN_MAX_CONNECTIONS: usize = 256;

/// One HTTP server to start: which routes, on how many workers.
pub(super) struct ServerPlan {
    pub(super) state: web::Data<AppState>,
    /// HTTPS for its TCP listeners.
    pub(super) tls: Option<ServerTls>,
    pub(super) routes: Routes,
    pub(super) workers: usize,
    /// Over all its workers.
    pub(super) max_connections: usize,
    pub(super) shutdown_timeout: Duration,
    /// Who may read the operator's routes there.
    pub(super) operator: OperatorAccess,
}

impl ServerPlan {
    /// Binds the server to `listeners` and starts it; Unix sockets are handed to `sockets` to be kept.
    pub(super) fn serve(
        self,
        listeners: Vec<Listener>,
        sockets: &mut Vec<listener::UnixSocket>,
    ) -> anyhow::Result<actix_web::dev::Server> {
        let (state, routes) = (self.state, self.routes);
        let operator = web::Data::new(self.operator);
        // actix counts connections per worker.
        let mut server = HttpServer::new(move || http::app(state.clone(), routes).app_data(operator.clone()))
            .workers(self.workers)
            .max_connections(self.max_connections.div_ceil(self.workers))
            .disable_signals()
            .shutdown_timeout(self.shutdown_timeout.as_secs().max(1));
        for listener in listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    let address = tcp.local_addr()?;
                    server = match &self.tls {
                        Some(tls) => server.listen_rustls_0_23(tcp, tls.server_config())?,
                        None => server.listen(tcp)?,
                    };
                    match routes {
                        Routes::Admin => {
                            info!(address = %address, admin_port = address.port(), "admin listener is listening")
                        }
                        Routes::All | Routes::Public => {
                            info!(address = %address, port = address.port(), "ingest-gateway is listening")
                        }
                        Routes::Osmand => {
                            info!(address = %address, osmand_port = address.port(), "OsmAnd listener is listening")
                        }
                    }
                }
                Listener::Unix(socket) => {
                    server = server.listen_uds(socket.listener.try_clone()?)?;
                    info!(socket = %socket.path.display(), admin = routes == Routes::Admin, "ingest-gateway is listening");
                    sockets.push(socket);
                }
            }
        }
        Ok(server.run())
    }
}
