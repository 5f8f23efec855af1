//! `vmwatch logs`: the log vault, read straight from its files under the
//! daemon's state directory (the daemon need not run to read or verify).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::trace_cmd::daemon_client::{state_dir, DaemonClient};

/// `vmwatch logs ...`
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LogsArgs {
    #[command(subcommand)]
    pub command: Option<LogsCommand>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum LogsCommand {
    /// Check a VM's vault: every record's hash chain and every signed
    /// checkpoint; names the first modified, removed, inserted, reordered or
    /// truncated record. Exit status 1 if the vault is not intact.
    Verify {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// The daemon's vault counters per VM (stored, rate-limited, refused by
    /// the plugin, tag/pid mismatches, cut).
    Stats,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ShowArgs {
    /// The VM whose vault to show.
    #[arg(long)]
    pub vm: Option<String>,
    /// Keep printing records as they are stored.
    #[arg(long)]
    pub follow: bool,
    /// Only records from this time on (RFC 3339, e.g. 2026-12-01T21:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records whose message matches this regular expression.
    #[arg(long)]
    pub grep: Option<String>,
    /// Only records after this sequence number.
    #[arg(long)]
    pub after: Option<u64>,
    /// One JSON object per record.
    #[arg(long, conflicts_with = "rfc5424")]
    pub json: bool,
    /// RFC 5424 lines (for a syslog collector).
    #[arg(long)]
    pub rfc5424: bool,
}

fn vault_dir() -> PathBuf {
    state_dir().join("vault")
}

pub fn run(args: LogsArgs) -> Result<()> {
    match args.command {
        Some(LogsCommand::Verify { vm, json }) => verify(&vm, json),
        Some(LogsCommand::Stats) => stats(),
        None => show(&args.show),
    }
}

fn known(vm: &str) -> Result<()> {
    let dir = vault_dir();
    if !dir.join(vm).join("vault.json").exists() {
        bail!(
            "no log vault for VM `{vm}` under {}: vmwatchd creates it when it watches the VM (`vmwatchd --watch {vm}`)",
            dir.display()
        );
    }
    Ok(())
}

fn show(a: &ShowArgs) -> Result<()> {
    let Some(vm) = a.vm.as_deref() else {
        bail!("which VM? use `vmwatch logs --vm NAME` (or `vmwatch logs verify --vm NAME`)");
    };
    known(vm)?;
    let mut q = logvault::Query::all();
    if let Some(s) = &a.since {
        let t = humantime::parse_rfc3339_weak(s)
            .with_context(|| format!("bad time `{s}`: use RFC 3339, e.g. 2026-12-01T21:00:00Z"))?;
        let ns = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        q = q.since(ns);
    }
    if let Some(g) = &a.grep {
        q = q.grep(g)?;
    }
    let mut after = a.after;
    let mut out = std::io::stdout().lock();
    loop {
        let mut query = q.clone();
        if let Some(s) = after {
            query = query.after(s);
        }
        for rec in logvault::read(&vault_dir(), vm, &query)? {
            let rec = rec?;
            after = Some(rec.seq);
            let line = if a.json {
                logvault::json_line(&rec)
            } else if a.rfc5424 {
                logvault::rfc5424(&rec, vm)
            } else {
                text(&rec)
            };
            writeln!(out, "{}", line.trim_end_matches('\n'))?;
        }
        if !a.follow {
            return Ok(());
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `TIME VM #SEQ PID COMM (EXE uid UID) [FLAGS] MESSAGE`.
fn text(rec: &logvault::StoredRecord) -> String {
    let r = &rec.record;
    let flags = logvault::flag_names(r.flags);
    let flags = if flags.is_empty() {
        String::new()
    } else {
        format!(" [{}]", flags.join(","))
    };
    format!(
        "{} {} #{} {} {} ({} uid {}){} {}",
        logvault::rfc3339(r.time_ns, 3),
        r.vm,
        rec.seq,
        r.tgid,
        r.comm,
        r.exe.as_deref().unwrap_or("?"),
        r.uid.map_or_else(|| "?".to_string(), |u| u.to_string()),
        flags,
        String::from_utf8_lossy(&r.message).trim_end_matches('\n')
    )
}

fn verify(vm: &str, json: bool) -> Result<()> {
    known(vm)?;
    let rep = logvault::verify(&vault_dir(), vm)?;
    if json {
        let bad = rep.first_bad.as_ref().map(|b| b.to_string());
        println!(
            "{}",
            serde_json::json!({
                "vm": vm, "ok": rep.ok(), "records": rep.records, "checkpoints": rep.checkpoints,
                "last_signed_seq": rep.last_signed_seq, "unsigned_tail": rep.unsigned_tail,
                "first_bad": bad,
            })
        );
    } else if let Some(bad) = &rep.first_bad {
        println!("vault of `{vm}` is NOT intact: first bad record: {bad}");
    } else {
        println!(
            "vault of `{vm}` is intact: {} records, {} signed checkpoints (last signed seq {}), {} records after it not signed yet",
            rep.records,
            rep.checkpoints,
            rep.last_signed_seq
                .map_or_else(|| "none".to_string(), |s| s.to_string()),
            rep.unsigned_tail
        );
    }
    if !rep.ok() {
        std::process::exit(1);
    }
    Ok(())
}

fn stats() -> Result<()> {
    let dir = state_dir();
    let Some(c) = DaemonClient::discover_in(&dir)? else {
        bail!(
            "no vmwatchd answers at {}: start it with `vmwatchd --watch-all &`",
            dir.display()
        );
    };
    let s = c.call("GET", "/v1/logs/stats", None)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}
