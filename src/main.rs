//! The `ingest-gateway` binary: parses the command line and runs `serve` (the default) or `migrate`.

use std::process::ExitCode;

use clap::Parser;
use ingest_gateway::config::{Cli, Command};
use ingest_gateway::startup::shutdown;
use ingest_gateway::startup::{self, Application};
use ingest_gateway::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.settings.log_format);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings),
        Command::Migrate => startup::migrate(&cli.settings).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|error| {
        tracing::error!(error = format!("{error:#}"), "ingest-gateway failed");
        ExitCode::FAILURE
    })
}

fn serve(settings: &ingest_gateway::config::Settings) -> anyhow::Result<ExitCode> {
    let app = Application::build(settings)?;
    let outcome = actix_web::rt::System::new().block_on(app.run(shutdown::termination_signal()))?;
    Ok(if outcome.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
