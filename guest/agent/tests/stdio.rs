//! The agent binary on the host, serving on stdin/stdout (`--stdio`): the
//! protocol without a VM, so these run in milliseconds.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmwatch_agent::{ExecRequest, FromAgent, Ping, ToAgent};

/// Sends `lines` to a fresh agent, closes its stdin, returns every reply.
fn converse(lines: &[String]) -> Vec<FromAgent> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmwatch-agent"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        stdin.write_all(l.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    drop(stdin);
    let replies = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).expect("agent lines are protocol messages"))
        .collect();
    child.wait().unwrap();
    replies
}

fn exec(id: u64, argv: &[&str]) -> ExecRequest {
    ExecRequest {
        id,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdin: None,
        timeout_ms: None,
        env: Default::default(),
        cwd: None,
    }
}

fn line(msg: &ToAgent) -> String {
    serde_json::to_string(msg).unwrap()
}

#[test]
fn serves_pings_commands_and_survives_bad_requests() {
    let mut with_stdin = exec(4, &["cat"]);
    with_stdin.stdin = Some(vec![0, 1, 2, 255]);
    let mut timed = exec(5, &["sleep", "30"]);
    timed.timeout_ms = Some(200);
    let t = Instant::now();
    let replies = converse(&[
        line(&ToAgent::Ping(Ping { ping: 1 })),
        "this is not json".into(),
        r#"{"id": 2}"#.into(),
        line(&ToAgent::Exec(exec(
            3,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
        ))),
        line(&ToAgent::Exec(with_stdin)),
        line(&ToAgent::Exec(timed)),
        line(&ToAgent::Exec(exec(6, &["/no/such/binary"]))),
        line(&ToAgent::Exec(exec(7, &["sh", "-c", "sleep 2 & echo bg"]))),
        String::new(),
        line(&ToAgent::Ping(Ping { ping: 8 })),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let mut it = replies.into_iter();
    assert!(matches!(it.next(), Some(FromAgent::Ready(r)) if r.ready));
    assert!(matches!(it.next(), Some(FromAgent::Pong(p)) if p.pong == 1));
    assert!(matches!(it.next(), Some(FromAgent::Error(e)) if e.id.is_none()));
    assert!(matches!(it.next(), Some(FromAgent::Error(e)) if e.id == Some(2)));
    match it.next() {
        Some(FromAgent::Exec(r)) => {
            assert_eq!((r.id, r.status, r.signal), (3, Some(3), None));
            assert_eq!(
                (r.stdout.as_slice(), r.stderr.as_slice()),
                (&b"out\n"[..], &b"err\n"[..])
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(it.next(), Some(FromAgent::Exec(r)) if r.stdout == [0, 1, 2, 255]));
    match it.next() {
        Some(FromAgent::Exec(r)) => {
            assert!(r.timed_out);
            assert_eq!((r.status, r.signal), (None, Some(9)));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(it.next(), Some(FromAgent::Error(e)) if e.id == Some(6) && e.error.contains("cannot run"))
    );
    assert!(matches!(it.next(), Some(FromAgent::Exec(r)) if r.stdout == b"bg\n"));
    assert!(matches!(it.next(), Some(FromAgent::Pong(p)) if p.pong == 8));
    assert!(it.next().is_none());
}

#[test]
fn snapshot_prints_json_of_this_system() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmwatch-agent"))
        .arg("snapshot")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == 1));
}
