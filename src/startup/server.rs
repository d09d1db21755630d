//! The transports of the start: every listener bound before the gateway runs (HTTP, admin, OsmAnd and the tracker
//! TCP ports), and one actix server per kind of listener, started and stopped together.

use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::rt::task::JoinHandle;
use actix_web::{web, HttpServer};
use tracing::info;

use super::https::ServerTls;
use super::listener::{self, Listener};
use super::reload::Reloads;
use super::Role;
use crate::config::Settings;
use crate::http::auth::OperatorAccess;
use crate::http::{self, AppState, Routes};

/// The HTTP listeners, bound.
pub(super) struct HttpListeners {
    /// `INGEST_LISTEN`.
    pub public: Vec<Listener>,
    /// The operator's listeners (`INGEST_ADMIN_LISTEN`); empty when everything is served on `public`.
    pub admin: Vec<Listener>,
    /// `INGEST_OSMAND_LISTEN`: every path is the OsmAnd protocol.
    pub osmand: Vec<Listener>,
}

/// Every listener of the gateway, bound.
pub(super) struct Bound {
    pub http: HttpListeners,
    /// `INGEST_TELTONIKA_LISTEN`, `INGEST_GT06_LISTEN`: the hardware trackers' TCP listeners.
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
        http: HttpListeners {
            public: listeners,
            admin: admin_listeners,
            osmand: osmand_listeners,
        },
        trackers,
        port,
    })
}

/// The HTTP servers of a running gateway.
pub(super) struct Servers {
    /// The public listeners' server; its task ends before the stop only when the server fails.
    public: ServerHandle,
    pub public_task: JoinHandle<std::io::Result<()>>,
    /// The admin and OsmAnd listeners' servers, when they have listeners, in the order they stop.
    others: Vec<(ServerHandle, JoinHandle<std::io::Result<()>>)>,
    /// Kept until the servers have stopped: a socket file is removed when its listener goes.
    _sockets: Vec<listener::UnixSocket>,
}

impl Servers {
    /// Stops the servers, letting the requests in flight finish: the public one (unless it already failed), then
    /// the admin and OsmAnd ones.
    pub async fn stop(&self, public_running: bool) {
        if public_running {
            self.public.stop(true).await;
        }
        for (server, _) in &self.others {
            server.stop(true).await;
        }
    }
}

/// Starts one HTTP server per kind of listener: the public one (with the operator's routes, unless they have a
/// listener of their own), the admin one and the OsmAnd one.
pub(super) fn start(
    listeners: HttpListeners,
    role: Role,
    state: &web::Data<AppState>,
    tls: Option<&ServerTls>,
    max_connections: usize,
    shutdown_timeout: Duration,
) -> anyhow::Result<Servers> {
    // Kept until the servers have stopped: a socket file is removed when its listener goes.
    let mut sockets = Vec::new();
    let public_routes = if role == Role::Write {
        Routes::Admin
    } else if listeners.admin.is_empty() {
        Routes::All
    } else {
        Routes::Public
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The operator's routes on the public listeners: with keys in force, only for the admin token's holder where
    // other machines can reach them.
    let exposed = listeners.public.iter().any(listener::is_exposed);
    let operator = if public_routes == Routes::Public {
        OperatorAccess::Open
    } else {
        state.access.operator_access(exposed)
    };
    if let OperatorAccess::Token(token) = &operator {
        match token {
            Some(_) => info!("the operator's routes on the public listeners need the admin token"),
            None => tracing::warn!(
                "API keys are in force and the public listeners are reachable from other machines: /metrics, \
                 /stats and the status page answer 401 there (and /readyz gives no reasons); set \
                 INGEST_ADMIN_TOKEN_FILE or INGEST_ADMIN_LISTEN"
            ),
        }
    }
    let server = ServerPlan {
        state: state.clone(),
        routes: public_routes,
        workers,
        max_connections,
        shutdown_timeout,
        tls: tls.cloned(),
        operator,
    }
    .serve(listeners.public, &mut sockets)?;
    let admin = if listeners.admin.is_empty() {
        None
    } else {
        // Few requests, from operators and scrapers: one worker, and its own connection cap.
        let admin = ServerPlan {
            state: state.clone(),
            routes: Routes::Admin,
            // The admin listener is meant for a private network: plain HTTP, for scrapers and probes.
            tls: None,
            workers: 1,
            max_connections: ADMIN_MAX_CONNECTIONS,
            shutdown_timeout,
            operator: OperatorAccess::Open,
        }
        .serve(listeners.admin, &mut sockets)?;
        let handle = admin.handle();
        Some((handle, actix_web::rt::spawn(admin)))
    };
    let osmand = if listeners.osmand.is_empty() {
        None
    } else {
        // Trackers on the internet: the public listener's TLS and limits.
        let osmand = ServerPlan {
            state: state.clone(),
            routes: Routes::Osmand,
            tls: tls.cloned(),
            workers,
            max_connections,
            shutdown_timeout,
            operator: OperatorAccess::Open,
        }
        .serve(listeners.osmand, &mut sockets)?;
        let handle = osmand.handle();
        Some((handle, actix_web::rt::spawn(osmand)))
    };
    let public = server.handle();
    let public_task = actix_web::rt::spawn(server);
    let others = [admin, osmand].into_iter().flatten().collect();
    Ok(Servers {
        public,
        public_task,
        others,
        _sockets: sockets,
    })
}

/// Connections the admin listener keeps open at most.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// One HTTP server to start: which routes, on how many workers.
struct ServerPlan {
    state: web::Data<AppState>,
    /// HTTPS for its TCP listeners.
    tls: Option<ServerTls>,
    routes: Routes,
    workers: usize,
    /// Over all its workers.
    max_connections: usize,
    shutdown_timeout: Duration,
    /// Who may read the operator's routes there.
    operator: OperatorAccess,
}

impl ServerPlan {
    /// Binds the server to `listeners` and starts it; Unix sockets are handed to `sockets` to be kept.
    fn serve(
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
