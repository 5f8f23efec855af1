//! Export formats and the sender identity check, as exact strings.

use logvault::{
    check_identity, json_line, rfc5424, LogRecord, StoredRecord, FLAG_CUT, FLAG_TAG_MISMATCH,
};

fn sshd() -> StoredRecord {
    StoredRecord {
        seq: 42,
        prev_hash: [0; 32],
        hash: [0xab; 32],
        record: LogRecord {
            vm: "web1".into(),
            vm_uuid: "4c4c4544-0042-3510-8052-b4c04f4d3732".into(),
            time_ns: 1_763_005_282_123_456_789,
            vcpu: 1,
            cr3: 0x1a2b_3000,
            pid: 1178,
            tgid: 1177,
            comm: "sshd".into(),
            exe: Some("/usr/sbin/sshd".into()),
            uid: Some(0),
            flags: 0,
            message: b"<38>Nov 13 03:41:22 sshd[1177]: Server listening on 0.0.0.0 port 22."
                .to_vec(),
        },
    }
}

fn weird() -> StoredRecord {
    StoredRecord {
        seq: 0,
        prev_hash: [0x11; 32],
        hash: [0x22; 32],
        record: LogRecord {
            vm: "web1".into(),
            vm_uuid: "u".into(),
            time_ns: 1_000_000_000,
            vcpu: 0,
            cr3: 0,
            pid: 7,
            tgid: 7,
            comm: "we\"ird]\\".into(),
            exe: Some("/tmp/a]b\"c".into()),
            uid: None,
            flags: FLAG_TAG_MISMATCH | FLAG_CUT,
            message: b"hello\xff\nworld".to_vec(),
        },
    }
}

#[test]
fn rfc5424_lines() {
    assert_eq!(
        rfc5424(&sshd(), "web1"),
        "<38>1 2025-11-13T03:41:22.123456Z web1 sshd 1177 - [vmwatch@32473 vm=\"web1\" \
         uuid=\"4c4c4544-0042-3510-8052-b4c04f4d3732\" seq=\"42\" tid=\"1178\" comm=\"sshd\" \
         exe=\"/usr/sbin/sshd\" uid=\"0\"] Server listening on 0.0.0.0 port 22."
    );
    // No PRI (13), no tag (APP-NAME from comm), quotes, ] and \ escaped in
    // structured data, invalid UTF-8 as U+FFFD, the newline as #012 so the
    // guest cannot start a second line; empty hostname -> VM name.
    assert_eq!(
        rfc5424(&weird(), ""),
        "<13>1 1970-01-01T00:00:01.000000Z web1 we\"ird]\\ 7 - [vmwatch@32473 vm=\"web1\" \
         uuid=\"u\" seq=\"0\" tid=\"7\" comm=\"we\\\"ird\\]\\\\\" exe=\"/tmp/a\\]b\\\"c\" \
         flags=\"tag-mismatch,cut\"] hello\u{fffd}#012world"
    );
    // A tag with spaces or non-ASCII is not taken as APP-NAME; an empty
    // message body leaves MSG out.
    let mut r = sshd();
    r.record.message = b"<191>Nov  3 03:41:22 s\xc3\xa9: ".to_vec();
    r.record.exe = None;
    r.record.uid = None;
    assert_eq!(
        rfc5424(&r, "host-a"),
        "<191>1 2025-11-13T03:41:22.123456Z host-a s__ 1177 - [vmwatch@32473 vm=\"web1\" \
         uuid=\"4c4c4544-0042-3510-8052-b4c04f4d3732\" seq=\"42\" tid=\"1178\" comm=\"sshd\"]"
    );
}

#[test]
fn json_lines() {
    let ab = "ab".repeat(32);
    assert_eq!(
        json_line(&sshd()),
        format!(
            "{{\"vm\":\"web1\",\"vm_uuid\":\"4c4c4544-0042-3510-8052-b4c04f4d3732\",\"seq\":42,\
             \"time\":\"2025-11-13T03:41:22.123456789Z\",\"time_ns\":1763005282123456789,\"vcpu\":1,\
             \"cr3\":\"0x1a2b3000\",\"pid\":1178,\"tgid\":1177,\"comm\":\"sshd\",\
             \"exe\":\"/usr/sbin/sshd\",\"uid\":0,\"flags\":0,\"flag_names\":[],\
             \"message\":\"<38>Nov 13 03:41:22 sshd[1177]: Server listening on 0.0.0.0 port 22.\",\
             \"prev_hash\":\"{}\",\"hash\":\"{ab}\"}}",
            "0".repeat(64)
        )
    );
    assert_eq!(
        json_line(&weird()),
        format!(
            "{{\"vm\":\"web1\",\"vm_uuid\":\"u\",\"seq\":0,\"time\":\"1970-01-01T00:00:01.000000000Z\",\
             \"time_ns\":1000000000,\"vcpu\":0,\"cr3\":\"0x0\",\"pid\":7,\"tgid\":7,\
             \"comm\":\"we\\\"ird]\\\\\",\"exe\":\"/tmp/a]b\\\"c\",\"uid\":null,\"flags\":5,\
             \"flag_names\":[\"tag-mismatch\",\"cut\"],\"message\":\"hello\u{fffd}\\nworld\",\
             \"message_base64\":\"aGVsbG//Cndvcmxk\",\"prev_hash\":\"{}\",\"hash\":\"{}\"}}",
            "11".repeat(32),
            "22".repeat(32)
        )
    );
    // Always one line, always valid JSON.
    let v: serde_json::Value = serde_json::from_str(&json_line(&weird())).unwrap();
    assert_eq!(v["message_base64"], "aGVsbG//Cndvcmxk");
}

#[test]
fn identity_check() {
    // glibc with LOG_PID.
    let m = b"<38>Nov 13 03:41:22 sshd[1177]: Server listening";
    assert!(check_identity(m, 1177, "sshd"));
    assert!(!check_identity(m, 1178, "sshd"), "pid of another process");
    assert!(!check_identity(m, 1177, "evil"), "tag of another program");
    // Without LOG_PID: only the tag is checked.
    let m = b"<13>Nov  3 03:41:22 cron: (root) CMD (run-parts)";
    assert!(check_identity(m, 5, "cron"));
    assert!(!check_identity(m, 5, "bash"));
    // Tag as a path (ident = argv[0]).
    assert!(check_identity(
        b"<13>Nov  3 03:41:22 /usr/sbin/sshd[9]: x",
        9,
        "sshd"
    ));
    // comm is cut by the kernel at 15 bytes.
    let m = b"<30>Nov 13 03:41:22 systemd-networkd[311]: eth0: Gained carrier";
    assert!(check_identity(m, 311, "systemd-network"));
    assert!(
        !check_identity(m, 311, "systemd"),
        "a 7-byte comm is not a cut name"
    );
    assert!(!check_identity(
        b"<30>Nov 13 03:41:22 systemd-networkX[311]: x",
        311,
        "systemd-netwo"
    ));
    // No header at all: nothing to contradict.
    assert!(check_identity(b"just text", 1, "anything"));
    assert!(check_identity(
        b"<13>Nov  3 03:41:22 hello world: no tag here",
        1,
        "x"
    ));
    // LOG_PID without a tag.
    assert!(check_identity(b"<13>Nov  3 03:41:22 [77] msg", 77, "x"));
    assert!(!check_identity(b"<13>Nov  3 03:41:22 [78] msg", 77, "x"));
    // Absurd pid.
    assert!(!check_identity(
        b"<13>Nov  3 03:41:22 x[9999999999]: m",
        1410065407,
        "x"
    ));
}
