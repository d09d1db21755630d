//! The embedded PostgreSQL as other programs drive it: its process, its version and its temporary directory; and
//! who may reach it: only with its password, through a private socket directory, never through a planted link.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ingest_gateway::db::embedded::PASSWORD_FILE;
use ingest_gateway::db::{EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};

use crate::helpers::Db;

#[test]
fn a_throwaway_server_names_its_process_and_version_and_removes_its_directory_after_stopping() {
    let mut server = EmbeddedPostgres::start_ephemeral_crash_safe().expect("start PostgreSQL");
    let pid = server.pid().expect("a running server has a process");
    assert!(Path::new(&format!("/proc/{pid}/stat")).exists());
    let version = server.version().expect("postgres --version runs");
    assert!(version.contains("PostgreSQL"), "{version}");

    let dir = server
        .temp_dir()
        .expect("a throwaway server has a directory")
        .to_owned();
    let canonical = dir.canonicalize().expect("the directory exists");
    assert!(server.data_dir().starts_with(&canonical));
    std::fs::write(dir.join("scratch.log"), "kept with the server").expect("a caller may write there");

    server.stop();
    assert_eq!(server.pid(), None);
    assert!(dir.exists(), "a stopped server keeps its directory until it is dropped");
    drop(server);
    assert!(!dir.exists());
}

/// The user the server runs as: the `postgres` user (or `nobody`) under root, this process's user otherwise.
fn server_uid() -> u32 {
    ingest_gateway::db::embedded::server_user()
        .map(|(uid, _)| uid)
        // SAFETY: geteuid cannot fail.
        .unwrap_or_else(|| unsafe { libc::geteuid() })
}

/// Whether a connection with `config` is let in.
fn connects(config: &tokio_postgres::Config) -> Result<(), tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.map(|_| ())
    })
}

/// The lines of a pg_hba.conf that are not comments.
fn hba_rules(server: &EmbeddedPostgres) -> Vec<String> {
    std::fs::read_to_string(server.data_dir().join("pg_hba.conf"))
        .unwrap()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_socket_directory_is_private_and_no_client_gets_in_without_the_password() {
    // A path long enough that the socket moves to a directory of its own.
    let base = tempfile::tempdir().unwrap();
    let long = base
        .path()
        .join("a-data-directory-whose-path-is-too-long-for-a-unix-socket-name-xxxxxxxxxxxxxxxxx");
    std::fs::create_dir(&long).unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let short = EmbeddedPostgres::start_ephemeral().expect("start PostgreSQL");
    let moved = EmbeddedPostgres::start(&PostgresOptions {
        data_dir: long.join("postgres"),
        ephemeral: true,
    })
    .expect("start PostgreSQL");
    assert_ne!(
        moved.socket_dir(),
        moved.data_dir(),
        "the socket moved out of the long path"
    );

    for server in [&short, &moved] {
        let socket_dir = std::fs::metadata(server.socket_dir()).unwrap();
        assert_eq!(socket_dir.mode() & 0o777, 0o700, "{}", server.socket_dir().display());
        assert_eq!(socket_dir.uid(), server_uid());
        let password_file = std::fs::metadata(server.data_dir().join(PASSWORD_FILE)).unwrap();
        assert_eq!(password_file.mode() & 0o777, 0o600);
        assert_eq!(password_file.uid(), server_uid());

        let rules = hba_rules(server);
        assert!(!rules.is_empty());
        assert!(
            rules.iter().all(|r| !r.split_whitespace().any(|f| f == "trust")),
            "{rules:?}"
        );
        assert!(rules.iter().all(|r| r.starts_with("local")), "no TCP rule: {rules:?}");

        connects(&server.config("postgres")).expect("the password lets the gateway in");
        let mut without = server.config("postgres");
        without.password("");
        assert!(connects(&without).is_err(), "no password, no connection");
        let mut wrong = server.config("postgres");
        wrong.password("guess");
        assert!(connects(&wrong).is_err(), "a wrong password, no connection");
    }
}

#[test]
fn a_cluster_an_earlier_version_made_with_trust_gets_a_password_at_its_next_start_and_keeps_its_data() {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let options = PostgresOptions {
        data_dir: base.path().join("postgres"),
        ephemeral: true,
    };
    let server = EmbeddedPostgres::start(&options).expect("start PostgreSQL");
    Db::connect(server.config("postgres")).execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)");
    let data_dir = server.data_dir().to_owned();
    let old_password = server.password().to_owned();
    drop(server);
    // What earlier versions left: trust for everyone, and no password file.
    std::fs::write(
        data_dir.join("pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    std::fs::remove_file(data_dir.join(PASSWORD_FILE)).unwrap();

    let server = EmbeddedPostgres::start(&options).expect("start the old cluster");

    assert_ne!(server.password(), old_password, "a new password was made");
    let rules = hba_rules(&server);
    assert!(rules.iter().all(|r| !r.contains("trust")), "{rules:?}");
    let mut without = server.config("postgres");
    without.password("");
    assert!(connects(&without).is_err(), "trust is gone");
    let db = Db::connect(server.config("postgres"));
    assert_eq!(db.count("kept"), 1, "the data is still there");
}

#[test]
fn a_symbolic_link_planted_in_the_data_directory_is_refused_and_its_target_left_alone() {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("precious");
    std::fs::write(&target, "root's file").unwrap();
    let before = std::fs::metadata(&target).unwrap();

    // The log file, opened by the gateway (maybe root) and handed to the server.
    let data_dir = base.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::os::unix::fs::symlink(&target, data_dir.join("postgres.log")).unwrap();
    let error = EmbeddedPostgres::start(&PostgresOptions {
        data_dir: data_dir.join("postgres"),
        ephemeral: true,
    })
    .expect_err("a linked log file is refused");
    assert!(matches!(error, EmbeddedPostgresError::SymbolicLink(_)), "{error}");
    assert!(error.to_string().contains("postgres.log"), "{error}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's file");

    // The cluster directory itself, which root hands to the server's user.
    if ingest_gateway::db::embedded::server_user().is_some() {
        let data_dir = base.path().join("data2");
        std::fs::create_dir(&data_dir).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), data_dir.join("postgres")).unwrap();
        let error = EmbeddedPostgres::start(&PostgresOptions {
            data_dir: data_dir.join("postgres"),
            ephemeral: true,
        })
        .expect_err("a linked cluster directory is refused as root");
        assert!(matches!(error, EmbeddedPostgresError::SymbolicLink(_)), "{error}");
        let after = std::fs::metadata(elsewhere.path()).unwrap();
        assert_eq!(after.uid(), 0, "not handed over");
    }
    let after = std::fs::metadata(&target).unwrap();
    assert_eq!((after.uid(), after.mode()), (before.uid(), before.mode()));
}
