//! `vmwatch hook` as a standalone binary, compiled from vmwatch's own
//! `hook_cmd.rs`: `cargo run --release -p gdb-hook --example hook_cli -- gdb --vm NAME`.

#[path = "../../vmwatch/src/hook_cmd.rs"]
mod hook_cmd;

use clap::Parser;

#[derive(Parser)]
#[command(name = "vmwatch-hook")]
struct Cli {
    #[command(subcommand)]
    command: hook_cmd::HookCommand,
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = hook_cmd::run(cli.command) {
        eprintln!("vmwatch: {err:#}");
        std::process::exit(1);
    }
}
