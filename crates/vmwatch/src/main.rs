//! `vmwatch`: a thin command line over the `vmi` and `lab` libraries.

mod lab_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmwatch", version, about = "Hypervisor-side security for Linux VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build guest images and run lab VMs (QEMU with shared RAM).
    Lab {
        #[command(subcommand)]
        command: lab_cmd::LabCommand,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMWATCH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab { command } => lab_cmd::run(command),
    };
    if let Err(err) = result {
        // One line that says what is wrong and what to do.
        eprintln!("vmwatch: {err:#}");
        std::process::exit(1);
    }
}
