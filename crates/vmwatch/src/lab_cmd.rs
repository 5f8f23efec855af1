//! `vmwatch lab ...` (placeholder; being written).
use clap::Subcommand;

#[derive(Subcommand)]
pub enum LabCommand {}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {}
}
