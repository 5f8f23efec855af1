//! The `trace_graph.txt` text: Ftrace's function_graph layout, written from
//! [`Trace`] and read back (for baselines).
//!
//! ```text
//! # tracer: function_graph
//! #
//! # CPU  DURATION                  FUNCTION CALLS
//! # |     |   |                     |   |   |   |
//! #### openat pid=97 tgid=97 comm="cat" task=0xffff8880036b8000 result=3 duration=412.310us
//!  0)               |  do_syscall_64() {
//!  0)   1.204 us    |    syscall_enter_from_user_mode();
//!  0)               |    x64_sys_call() {
//!  0)               |      __x64_sys_openat() {
//!  ...
//!  0) + 10.510 us   |      }
//!  0)               |      0xffffffffc0b37000() { /* !! not kernel or module text */
//! ```
//!
//! As in Ftrace: the CPU column, the duration of a leaf call on its line
//! and of a nested call on its closing brace, overhead marks (`+` over
//! 10 us, `!` 100 us, `#` 1 ms, `*` 10 ms, `@` 100 ms, `$` 1 s), two spaces
//! of indentation per level, and interrupts framed by `==========>` /
//! `<==========` lines. Ours adds one `####` comment line per syscall (which
//! call, which task, its result) and `/* ... */` notes: `!!` marks a call to
//! an address outside known text, the paper's sign of a hijacked pointer.
//! Durations are host time under TCG (with the recording's own cost), so
//! they compare calls with each other, not with a real CPU.

use std::collections::BTreeSet;
use std::io::{self, Write};

use crate::graph::{Flow, Node, Trace};
use crate::symbolize::{Place, Resolve};

/// The note on a call to an address outside known text.
pub const FLAG_NOTE: &str = "!! not kernel or module text";
const NO_RETURN_NOTE: &str = "no return seen";
const UNREAD_NOTE: &str = "indirect target unreadable";
/// Longest function name kept when reading a graph back.
const MAX_NAME: usize = 512;

/// Lines above the first flow.
#[derive(Debug, Clone, Default)]
pub struct Preamble {
    /// `# key: value` lines (VM, kernel, syscalls, counters).
    pub notes: Vec<(String, String)>,
}

/// A call outside known text, as found while writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flagged {
    pub syscall: String,
    pub pid: u32,
    pub address: u64,
    /// The function that made the call.
    pub caller: String,
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub flows: usize,
    pub complete: usize,
    pub calls: usize,
    pub flagged: Vec<Flagged>,
}

/// Ftrace's overhead mark for a duration.
fn mark(ns: u64) -> char {
    const MARKS: [(u64, char); 6] = [
        (1_000_000_000, '$'),
        (100_000_000, '@'),
        (10_000_000, '*'),
        (1_000_000, '#'),
        (100_000, '!'),
        (10_000, '+'),
    ];
    MARKS.iter().find(|(v, _)| ns > *v).map_or(' ', |(_, c)| *c)
}

/// The duration column and its separator, as Ftrace's
/// `print_graph_duration` writes it (14 characters, then `|  `); blank when
/// there is no duration.
pub fn duration_column(ns: Option<u64>) -> String {
    let Some(ns) = ns else {
        return "              |  ".to_string();
    };
    let mut s = String::with_capacity(20);
    s.push(mark(ns));
    s.push(' ');
    let usecs = (ns / 1000).to_string();
    let mut len = usecs.len();
    s.push_str(&usecs);
    if len < 7 {
        // At most 7 digits in all: fewer nanosecond digits for long times.
        let digits = format!("{:03}", ns % 1000);
        let keep = (8 - len).min(5) - 1;
        let digits = &digits[..keep.min(digits.len())];
        s.push('.');
        s.push_str(digits);
        len += digits.len() + 1;
    }
    s.push_str(" us ");
    for _ in len..8 {
        s.push(' ');
    }
    s.push_str("|  ");
    s
}

/// Whether a call made from `site` is an interrupt or exception entry (the
/// IDT stubs `asm_*`): interrupts are framed like Ftrace's; exceptions
/// (`asm_exc_*`, e.g. page faults of the syscall's own copies) are part of
/// the syscall's flow and are not.
fn is_interrupt(site: &Place) -> bool {
    matches!(site, Place::Kernel { name, .. } if name.starts_with("asm_") && !name.starts_with("asm_exc_"))
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    names: &'a dyn Resolve,
    cpu_width: usize,
    written: Written,
}

impl Writer<'_> {
    fn prefix(&self, vcpu: u16) -> String {
        format!(" {:>w$}) ", vcpu, w = self.cpu_width)
    }

    fn node(&mut self, flow: &Flow, n: &Node, depth: usize, parent: &str) -> io::Result<()> {
        let place = self.names.resolve(n.target);
        let mut label = if n.unread() {
            "?".to_string()
        } else {
            place.label(n.target)
        };
        label.truncate(MAX_NAME);
        let mut notes = Vec::new();
        if n.unread() {
            notes.push(UNREAD_NOTE);
        } else if place.flagged() {
            notes.push(FLAG_NOTE);
            self.written.flagged.push(Flagged {
                syscall: flow.name(),
                pid: flow.pid,
                address: n.target,
                caller: parent.to_string(),
            });
        }
        if n.duration_ns.is_none() {
            notes.push(NO_RETURN_NOTE);
        }
        let note = if notes.is_empty() {
            String::new()
        } else {
            format!(" /* {} */", notes.join("; "))
        };
        let irq = is_interrupt(&self.names.resolve(n.call_site));
        let pre = self.prefix(n.vcpu);
        if irq {
            writeln!(self.out, "{pre}  ==========> |")?;
        }
        let indent = "  ".repeat(depth);
        if n.children.is_empty() {
            writeln!(
                self.out,
                "{pre}{}{indent}{label}();{note}",
                duration_column(n.duration_ns)
            )?;
        } else {
            writeln!(
                self.out,
                "{pre}{}{indent}{label}() {{{note}",
                duration_column(None)
            )?;
            for c in &n.children {
                self.node(flow, c, depth + 1, &label)?;
            }
            writeln!(
                self.out,
                "{pre}{}{indent}}}",
                duration_column(n.duration_ns)
            )?;
        }
        if irq {
            writeln!(self.out, "{pre}  <========== |")?;
        }
        self.written.calls += 1;
        Ok(())
    }
}

/// Writes `trace` as a function_graph text, naming addresses with `names`.
pub fn write(
    trace: &Trace,
    names: &dyn Resolve,
    preamble: &Preamble,
    out: &mut dyn Write,
) -> io::Result<Written> {
    let max_cpu = trace
        .flows
        .iter()
        .map(|f| {
            let mut m = f.vcpu;
            f.walk(|n| m = m.max(n.vcpu));
            m
        })
        .max()
        .unwrap_or(0);
    writeln!(out, "# tracer: function_graph")?;
    writeln!(out, "#")?;
    writeln!(
        out,
        "# xftrace: kernel call flows recorded by vmwatch's TCG plugin, outside the guest"
    )?;
    for (k, v) in &preamble.notes {
        writeln!(out, "# {k}: {v}")?;
    }
    writeln!(out, "#")?;
    writeln!(out, "# CPU  DURATION                  FUNCTION CALLS")?;
    writeln!(out, "# |     |   |                     |   |   |   |")?;
    let mut w = Writer {
        out,
        names,
        cpu_width: max_cpu.to_string().len(),
        written: Written::default(),
    };
    for flow in &trace.flows {
        let result = flow
            .result
            .map_or_else(|| "?".to_string(), |r| r.to_string());
        let duration = match flow.end_ns {
            Some(end) => format!(
                " duration={:.3}us",
                end.saturating_sub(flow.start_ns) as f64 / 1e3
            ),
            None => " (no return to user mode seen)".to_string(),
        };
        writeln!(
            w.out,
            "#### {} pid={} tgid={} comm={:?} task={:#x} result={result}{duration}",
            flow.name(),
            flow.pid,
            flow.tgid,
            flow.comm,
            flow.task
        )?;
        for n in &flow.calls {
            w.node(flow, n, 0, &flow.name())?;
        }
        w.written.flows += 1;
        if flow.complete() {
            w.written.complete += 1;
        }
    }
    Ok(w.written)
}

/// One syscall's flow as read back from a graph text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowSummary {
    pub syscall: String,
    /// The `####` line.
    pub header: String,
    /// Functions called outside interrupts (labels as printed).
    pub functions: BTreeSet<String>,
    /// Addresses outside known text (anywhere, interrupts included).
    pub flagged: BTreeSet<String>,
}

/// Why a text is not a graph we wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a function_graph trace (no `# tracer: function_graph` line)")]
    NotAGraph,
}

/// Reads a graph written by [`write`] (or by hand in its layout). Lines it
/// does not understand are skipped.
pub fn parse(text: &str) -> Result<Vec<FlowSummary>, ParseError> {
    if !text
        .lines()
        .take(16)
        .any(|l| l.trim() == "# tracer: function_graph")
    {
        return Err(ParseError::NotAGraph);
    }
    let mut flows: Vec<FlowSummary> = Vec::new();
    let mut irq_depth = 0usize;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#### ") {
            flows.push(FlowSummary {
                syscall: rest.split_whitespace().next().unwrap_or("?").to_string(),
                header: rest.to_string(),
                ..FlowSummary::default()
            });
            irq_depth = 0;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((left, right)) = line.split_once('|') else {
            continue;
        };
        if left.contains("==========>") {
            irq_depth += 1;
            continue;
        }
        if left.contains("<==========") {
            irq_depth = irq_depth.saturating_sub(1);
            continue;
        }
        let Some(flow) = flows.last_mut() else {
            continue;
        };
        let (body, note) = match right.find("/*") {
            Some(i) => (&right[..i], &right[i..]),
            None => (right, ""),
        };
        let body = body.trim();
        let name = body
            .strip_suffix("() {")
            .or_else(|| body.strip_suffix("();"))
            .map(str::trim);
        let Some(name) = name.filter(|n| !n.is_empty() && n.len() <= MAX_NAME) else {
            continue;
        };
        if note.contains("!!") {
            flow.flagged.insert(name.to_string());
        } else if irq_depth == 0 && name != "?" {
            flow.functions.insert(name.to_string());
        }
    }
    Ok(flows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::build;
    use crate::record::{Kind, Record};

    /// Names for the hand-made sample of `graph::tests`.
    struct Names;

    impl Resolve for Names {
        fn resolve(&self, addr: u64) -> Place {
            let k = |n: &str| Place::Kernel {
                name: n.into(),
                offset: 0,
            };
            match addr {
                0x1000 => k("do_syscall_64"),
                0x2000 => k("__x64_sys_openat"),
                0x3000 => k("do_sys_openat2"),
                0x4000 => k("getname"),
                0x5000 => k("do_filp_open"),
                0x6000 => k("path_openat"),
                0x7000 => k("lookup_fast"),
                0x8000 => Place::Module {
                    module: "ext4".into(),
                    name: Some("ext4_file_open".into()),
                    offset: 0,
                },
                0x9000 => k("sysvec_apic_timer_interrupt"),
                0xa000 => k("asm_sysvec_apic_timer_interrupt"),
                0xb000 => k("asm_exc_page_fault"),
                0xc000 => k("exc_page_fault"),
                _ => Place::Outside,
            }
        }
    }

    #[test]
    fn duration_column_matches_ftrace() {
        // Widths and marks as Ftrace prints them.
        assert_eq!(duration_column(None), "              |  ");
        assert_eq!(duration_column(Some(1382)), "  1.382 us    |  ");
        assert_eq!(duration_column(Some(0)), "  0.000 us    |  ");
        assert_eq!(duration_column(Some(24_524)), "+ 24.524 us   |  ");
        assert_eq!(duration_column(Some(209_876)), "! 209.876 us  |  ");
        assert_eq!(duration_column(Some(1_234_567)), "# 1234.567 us |  ");
        assert_eq!(duration_column(Some(12_345_678)), "* 12345.67 us |  ");
        assert_eq!(duration_column(Some(123_456_789)), "@ 123456.7 us |  ");
        assert_eq!(duration_column(Some(1_234_567_890)), "$ 1234567 us  |  ");
        for ns in [0, 999, 10_001, 5_000_000_000u64] {
            assert_eq!(duration_column(Some(ns)).len(), 17, "{ns}");
        }
    }

    #[test]
    fn writes_the_function_graph_layout() {
        let trace = build(&crate::graph::tests::sample());
        let pre = Preamble {
            notes: vec![("vm".into(), "web1".into())],
        };
        let mut out = Vec::new();
        let w = write(&trace, &Names, &pre, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expect = r#"# tracer: function_graph
#
# xftrace: kernel call flows recorded by vmwatch's TCG plugin, outside the guest
# vm: web1
#
# CPU  DURATION                  FUNCTION CALLS
# |     |   |                     |   |   |   |
#### openat pid=100 tgid=100 comm="cat" task=0xa result=3 duration=89.000us
 0)               |  do_syscall_64() {
 0)               |    __x64_sys_openat() {
 0)               |      do_sys_openat2() {
 0)   0.500 us    |        getname();
 0)               |        do_filp_open() {
 0)               |          path_openat() {
 0)   0.250 us    |            lookup_fast();
 0) + 23.500 us   |          }
 0) + 24.000 us   |        }
 0) + 27.000 us   |      }
 0) + 29.000 us   |    }
 0)               |    ext4_file_open [ext4](); /* no return seen */
 0) + 78.000 us   |  }
#### read pid=200 tgid=200 comm="sh" task=0xb result=? (no return to user mode seen)
 1)               |  do_syscall_64(); /* no return seen */
"#;
        assert_eq!(text, expect);
        assert_eq!((w.flows, w.complete, w.calls), (2, 1, 9));
        assert!(w.flagged.is_empty());
        // Read back: functions per flow.
        let flows = parse(&text).unwrap();
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].syscall, "openat");
        assert!(flows[0].functions.contains("path_openat"));
        assert!(flows[0].functions.contains("ext4_file_open [ext4]"));
        assert_eq!(flows[0].functions.len(), 8);
        assert_eq!(flows[1].functions.len(), 1);
    }

    #[test]
    fn flags_outside_text_and_frames_interrupts() {
        let rec = |kind, time_ns, depth, target, pc| Record {
            time_ns,
            vcpu: 0,
            kind,
            flags: 0,
            depth,
            nr: 0,
            pc,
            target,
            sp: 0,
            task: 1,
            pid: 5,
            tgid: 5,
        };
        let mut entry = Record::entry(0, 0, 0, 1, 5, 5, b"cat");
        entry.time_ns = 0;
        let recs = vec![
            entry,
            rec(Kind::Call, 10, 0, 0x1000, 0),
            // The hijacked sys_call_table entry: a call into a vmalloc'd page.
            rec(Kind::Call, 20, 1, 0xffff_ffff_c0b3_7000, 0),
            // A timer interrupt while in it (called from the IDT stub).
            rec(Kind::Call, 30, 2, 0x9000, 0xa000),
            rec(Kind::Ret, 40, 2, 0, 0),
            // A page fault is part of the flow.
            rec(Kind::Call, 50, 2, 0xc000, 0xb000),
            rec(Kind::Ret, 60, 2, 0, 0),
            rec(Kind::Ret, 70, 1, 0, 0),
            rec(Kind::Ret, 80, 0, 0, 0),
            rec(Kind::Exit, 90, 0, 1, 0),
        ];
        let trace = build(&recs);
        let mut out = Vec::new();
        let w = write(&trace, &Names, &Preamble::default(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(" 0)               |    0xffffffffc0b37000() { /* !! not kernel or module text */\n"),
            "{text}"
        );
        assert!(text.contains(
            " 0)   ==========> |\n 0)   0.010 us    |      sysvec_apic_timer_interrupt();\n 0)   <========== |\n"
        ), "{text}");
        assert_eq!(
            w.flagged,
            vec![Flagged {
                syscall: "read".into(),
                pid: 5,
                address: 0xffff_ffff_c0b3_7000,
                caller: "do_syscall_64".into()
            }]
        );
        let flows = parse(&text).unwrap();
        assert_eq!(
            flows[0].flagged.iter().collect::<Vec<_>>(),
            vec!["0xffffffffc0b37000"]
        );
        // The interrupt handler is not part of read's functions; the page
        // fault handler is.
        assert!(!flows[0].functions.contains("sysvec_apic_timer_interrupt"));
        assert!(flows[0].functions.contains("exc_page_fault"));
        assert!(!flows[0].functions.contains("0xffffffffc0b37000"));
    }

    #[test]
    fn parse_rejects_other_text() {
        assert_eq!(parse("hello\n"), Err(ParseError::NotAGraph));
        // Garbage lines inside a graph are skipped.
        let flows =
            parse("# tracer: function_graph\n|||\n 0) |  x();\n#### read\n 0) | (\n 0) |  f() {\n")
                .unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].functions.iter().collect::<Vec<_>>(), vec!["f"]);
    }
}
