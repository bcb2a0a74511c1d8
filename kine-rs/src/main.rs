//! The `kine-rs` binary: parse flags, set up logging, serve.

use clap::Parser;
use kine::config::{Command, Config, LogFormat, unsupported_flag};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(flag) = unsupported_flag(&args) {
        anyhow::bail!(
            "kine's flag {flag} is not supported by kine-rs (see the README's flag list)"
        );
    }
    let config = Config::parse();
    let level = if config.debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("KINE_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Plain => subscriber.init(),
    }
    match config.command {
        Some(Command::Tenant(args)) => {
            if let Err(error) = kine::cli::run(args).await {
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        Some(Command::Migrate(args)) => {
            if let Err(error) = kine::migrate::command::run(args).await {
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        None => {}
    }
    kine::run::run(config).await?;
    Ok(())
}
