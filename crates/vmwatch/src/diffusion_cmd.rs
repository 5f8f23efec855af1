//! `vmwatch track ...` and `vmwatch diffusion ...`: register confidential
//! files and see where their content went, through vmwatchd (which keeps
//! the diffusion engine and its history).

use std::io::Write;

use anyhow::{bail, Result};

use crate::trace_cmd::daemon_client::{encode_query, state_dir, DaemonClient, SOCKET};

/// `vmwatch track ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TrackCommand {
    /// Register a confidential path (as the guest names it). A path that does
    /// not exist yet counts once it is created; processes holding it open
    /// now are managed at once.
    Add {
        #[arg(long)]
        vm: String,
        path: String,
    },
    /// Registered paths of a VM and the file each names now.
    List {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Unregister a path (the file leaves management; history stays).
    Rm {
        #[arg(long)]
        vm: String,
        path: String,
    },
}

/// `vmwatch diffusion ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DiffusionCommand {
    /// The diffusion graph: every managed object with the edge that made it
    /// managed, and the objects that left (when and why).
    Show {
        #[arg(long)]
        vm: String,
        /// The graph as it stood at this time (RFC 3339, e.g.
        /// 2026-11-21T10:00:01.123Z); default: now.
        #[arg(long)]
        at: Option<String>,
        #[arg(long, default_value = "text", value_parser = ["text", "json", "dot"])]
        format: String,
    },
    /// The delta log: one line per newly managed object, removal, rename or leak.
    Log {
        /// One VM (default: all).
        #[arg(long)]
        vm: Option<String>,
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// Only events after this id (see --json).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// NDJSON, one event per line, with ids.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn client() -> Result<DaemonClient> {
    let dir = state_dir();
    match DaemonClient::discover_in(&dir)? {
        Some(c) => Ok(c),
        None => bail!(
            "no vmwatchd answers at {}: start it with `vmwatchd --watch-all &` (diffusion tracking lives in the daemon)",
            dir.join(SOCKET).display()
        ),
    }
}

fn vm_path(vm: &str) -> String {
    format!("/v1/vms/{}", encode_query(vm))
}

pub fn track(cmd: TrackCommand) -> Result<()> {
    let c = client()?;
    let mut out = std::io::stdout().lock();
    match cmd {
        TrackCommand::Add { vm, path } => {
            let r = c.call(
                "POST",
                &format!("{}/track", vm_path(&vm)),
                Some(&serde_json::json!({ "path": path })),
            )?;
            print_events(&r, &mut out)?;
            if let Some(note) = r["note"].as_str() {
                eprintln!("vmwatch: {note}");
            }
        }
        TrackCommand::List { vm, json } => {
            let r = c.call("GET", &format!("{}/track", vm_path(&vm)), None)?;
            if json {
                writeln!(out, "{r}")?;
                return Ok(());
            }
            let regs = r["registrations"].as_array().cloned().unwrap_or_default();
            if regs.is_empty() {
                writeln!(out, "no registered paths in `{vm}`")?;
            }
            for reg in regs {
                let file = match &reg["file"] {
                    serde_json::Value::Null => "no file yet".to_string(),
                    f => format!(
                        "file dev {} ino {}",
                        f["dev"].as_u64().unwrap_or(0),
                        f["ino"].as_u64().unwrap_or(0)
                    ),
                };
                writeln!(out, "{}\t{file}", reg["path"].as_str().unwrap_or("?"))?;
            }
        }
        TrackCommand::Rm { vm, path } => {
            let r = c.call(
                "DELETE",
                &format!("{}/track?path={}", vm_path(&vm), encode_query(&path)),
                None,
            )?;
            print_events(&r, &mut out)?;
        }
    }
    Ok(())
}

fn print_events(r: &serde_json::Value, out: &mut impl Write) -> Result<()> {
    for ev in r["events"].as_array().into_iter().flatten() {
        writeln!(out, "{}", ev.as_str().unwrap_or_default())?;
    }
    Ok(())
}

pub fn diffusion(cmd: DiffusionCommand) -> Result<()> {
    let c = client()?;
    let mut out = std::io::stdout().lock();
    match cmd {
        DiffusionCommand::Show { vm, at, format } => {
            let mut q = format!("{}/diffusion?format={format}", vm_path(&vm));
            if let Some(at) = at {
                q.push_str(&format!("&at={}", encode_query(&at)));
            }
            let r = c.request("GET", &q, None)?;
            if !(200..300).contains(&r.status) {
                bail!("vmwatchd: {}", r.error_line());
            }
            out.write_all(&r.body)?;
            if !r.body.ends_with(b"\n") {
                writeln!(out)?;
            }
        }
        DiffusionCommand::Log {
            vm,
            follow,
            after,
            json,
        } => {
            let base = match &vm {
                Some(vm) => format!("{}/diffusion/log", vm_path(vm)),
                None => "/v1/diffusion/log".to_string(),
            };
            let q = format!(
                "{base}?after={after}&follow={}&format={}",
                u8::from(follow),
                if json { "json" } else { "text" }
            );
            let mut s = c.stream(&q)?;
            while let Some(line) = s.next_line()? {
                out.write_all(&line)?;
                out.write_all(b"\n")?;
                if follow {
                    out.flush()?;
                }
            }
        }
    }
    Ok(())
}
