//! The `ingest-gateway` binary: parses the command line and runs `serve` (the default), `write`, `migrate` or
//! `new-key`.

use std::process::ExitCode;

use clap::Parser;
use ingest_gateway::config::{Cli, Command};
use ingest_gateway::startup::shutdown;
use ingest_gateway::startup::{self, Application, Role};
use ingest_gateway::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.settings.log.log_format);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings, Role::Serve),
        Command::Write => serve(&cli.settings, Role::Write),
        Command::Migrate => startup::migrate(&cli.settings).map(|()| ExitCode::SUCCESS),
        Command::NewKey(args) => new_key(&args),
        Command::SettingsReference { page } => {
            ingest_gateway::config::reference::rewrite(&page).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|error| {
        tracing::error!(error = format!("{error:#}"), "ingest-gateway failed");
        ExitCode::FAILURE
    })
}

/// Prints the new key (on stdout, once) and its keys-file line; the explanations go to stderr, so that
/// `ingest-gateway new-key fleet | head -1` is the key alone.
fn new_key(args: &ingest_gateway::config::NewKeyArgs) -> anyhow::Result<ExitCode> {
    let made = startup::new_key::new_key(args)?;
    eprintln!("the key, shown this once (give it to the client; the gateway keeps only its hash):");
    println!("{}", made.key);
    eprintln!("the line to add to the API keys file (then send the gateway SIGHUP):");
    println!("{}", made.line);
    Ok(ExitCode::SUCCESS)
}

fn serve(settings: &ingest_gateway::config::Settings, role: Role) -> anyhow::Result<ExitCode> {
    // Before any other thread starts: it sets how the allocator keeps request bodies.
    ingest_gateway::http::limits::give_large_buffers_their_own_pages();
    let app = Application::build_as(settings, role)?;
    let outcome = actix_web::rt::System::new().block_on(app.run(shutdown::termination_signal()))?;
    Ok(if outcome.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
