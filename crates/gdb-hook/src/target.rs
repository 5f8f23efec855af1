//! Register numbers and `g`-packet offsets from the stub's target
//! description (`qXfer:features:read:target.xml` and the files it includes).
//!
//! GDB numbers registers in document order (includes expanded where they
//! appear), from 0, unless a `<reg>` carries `regnum`, from which numbering
//! continues. A `g` reply holds the registers 0, 1, 2... back to back, each
//! `bitsize / 8` bytes, little-endian on x86; QEMU puts exactly its core
//! feature (`i386-64bit.xml`) there. Nothing here is hard-coded: a QEMU that
//! renumbers its registers keeps working, and one that lacks a register we
//! need is refused at attach with its name.

use std::collections::HashMap;

/// Most files followed through `xi:include`.
pub const MAX_FILES: usize = 32;
/// Most registers accepted from one description.
pub const MAX_REGS: usize = 4096;

/// One `<reg>` of the description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegDesc {
    pub name: String,
    pub regnum: u32,
    pub bitsize: u32,
}

/// Why a target description is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("target description: {0}")]
    Malformed(String),
    #[error("target description has no register `{0}` (QEMU's x86-64 gdbstub exposes it since 2.x: is this an x86-64 guest?)")]
    MissingRegister(&'static str),
    #[error("target description: register `{name}` is {bits} bits, expected {expected}")]
    BadSize {
        name: &'static str,
        bits: u32,
        expected: u32,
    },
}

/// Tags found in one XML document, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlItem {
    /// `<reg name=.. bitsize=.. [regnum=..]/>`
    Reg {
        name: String,
        bitsize: u32,
        regnum: Option<u32>,
    },
    /// `<xi:include href=".."/>`
    Include(String),
}

/// The value of attribute `key` in the inside of a tag (`reg name="rax" ...`).
fn attr<'a>(tag: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = tag;
    // Bounded by the tag length: each round consumes at least one byte.
    while let Some(eq) = rest.find('=') {
        let before = rest[..eq].trim_end();
        let name_start = before
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let name = &before[name_start..];
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next()?;
        if quote != '"' && quote != '\'' {
            return None;
        }
        let body = &after[1..];
        let end = body.find(quote)?;
        if name == key {
            return Some(&body[..end]);
        }
        rest = &body[end + 1..];
    }
    None
}

/// The `<reg>` and `<xi:include>` tags of one document, in order. Comments,
/// processing instructions and other tags are skipped. Lenient about
/// everything it does not need, strict about what it returns.
pub fn scan(xml: &str) -> Result<Vec<XmlItem>, TargetError> {
    let mut items = Vec::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt + 1..];
        if let Some(body) = rest.strip_prefix("!--") {
            let end = body
                .find("-->")
                .ok_or_else(|| TargetError::Malformed("unterminated comment".into()))?;
            rest = &body[end + 3..];
            continue;
        }
        let gt = rest
            .find('>')
            .ok_or_else(|| TargetError::Malformed("unterminated tag".into()))?;
        let tag = rest[..gt].trim_end_matches('/').trim();
        rest = &rest[gt + 1..];
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        match &tag[..name_end] {
            "reg" => {
                let name = attr(tag, "name")
                    .ok_or_else(|| TargetError::Malformed(format!("<{tag}> has no name")))?;
                let bitsize = attr(tag, "bitsize")
                    .and_then(|b| b.parse::<u32>().ok())
                    .filter(|b| (1..=4096).contains(b))
                    .ok_or_else(|| {
                        TargetError::Malformed(format!("register `{name}` has no valid bitsize"))
                    })?;
                let regnum = match attr(tag, "regnum") {
                    Some(r) => Some(r.parse::<u32>().map_err(|_| {
                        TargetError::Malformed(format!("register `{name}` has regnum `{r}`"))
                    })?),
                    None => None,
                };
                if items.len() >= MAX_REGS {
                    return Err(TargetError::Malformed("too many registers".into()));
                }
                items.push(XmlItem::Reg {
                    name: name.to_string(),
                    bitsize,
                    regnum,
                });
            }
            "xi:include" => {
                let href = attr(tag, "href")
                    .ok_or_else(|| TargetError::Malformed("<xi:include> without href".into()))?;
                items.push(XmlItem::Include(href.to_string()));
            }
            _ => {}
        }
    }
    Ok(items)
}

/// Expands `target.xml` through its includes (fetched with `fetch`) into the
/// numbered register list. Include depth and file count are bounded; a file
/// included twice is read once (a cycle cannot loop).
pub fn registers(
    fetch: &mut dyn FnMut(&str) -> Result<String, TargetError>,
) -> Result<Vec<RegDesc>, TargetError> {
    let mut regs = Vec::new();
    let mut next = 0u32;
    let mut seen = Vec::new();
    expand("target.xml", fetch, &mut regs, &mut next, &mut seen, 0)?;
    Ok(regs)
}

fn expand(
    file: &str,
    fetch: &mut dyn FnMut(&str) -> Result<String, TargetError>,
    regs: &mut Vec<RegDesc>,
    next: &mut u32,
    seen: &mut Vec<String>,
    depth: usize,
) -> Result<(), TargetError> {
    if depth > 4 || seen.len() >= MAX_FILES {
        return Err(TargetError::Malformed(format!(
            "includes nested too deep or too many at `{file}`"
        )));
    }
    if seen.iter().any(|s| s == file) {
        return Ok(());
    }
    seen.push(file.to_string());
    let xml = fetch(file)?;
    for item in scan(&xml)? {
        match item {
            XmlItem::Include(href) => expand(&href, fetch, regs, next, seen, depth + 1)?,
            XmlItem::Reg {
                name,
                bitsize,
                regnum,
            } => {
                let n = regnum.unwrap_or(*next);
                *next = n.saturating_add(1);
                if regs.len() >= MAX_REGS {
                    return Err(TargetError::Malformed("too many registers".into()));
                }
                regs.push(RegDesc {
                    name,
                    regnum: n,
                    bitsize,
                });
            }
        }
    }
    Ok(())
}

/// Where one 64-bit register is: its number (for `p`) and, when the `g`
/// reply covers it, its byte offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegLoc {
    pub regnum: u32,
    pub g_offset: Option<usize>,
}

/// The registers the hook reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMap {
    pub rax: RegLoc,
    pub rcx: RegLoc,
    pub rdx: RegLoc,
    pub rsi: RegLoc,
    pub rdi: RegLoc,
    pub rsp: RegLoc,
    pub r8: RegLoc,
    pub r9: RegLoc,
    pub r10: RegLoc,
    pub rip: RegLoc,
    pub cr3: RegLoc,
    pub fs_base: RegLoc,
    pub gs_base: RegLoc,
    pub k_gs_base: RegLoc,
    /// 32 bits in QEMU's description (read and written as such).
    pub eflags: RegLoc,
}

impl RegisterMap {
    /// Finds each register by name. `g` offsets are known for the registers
    /// numbered 0, 1, 2... without a gap (the prefix `g` can carry).
    pub fn new(regs: &[RegDesc]) -> Result<RegisterMap, TargetError> {
        let by_num: HashMap<u32, &RegDesc> = regs.iter().map(|r| (r.regnum, r)).collect();
        let mut offsets = HashMap::new();
        let mut off = 0usize;
        for n in 0..regs.len() as u32 {
            let Some(r) = by_num.get(&n) else { break };
            offsets.insert(n, off);
            off += (r.bitsize as usize).div_ceil(8);
        }
        let find_sized = |name: &'static str, bits: u32| -> Result<RegLoc, TargetError> {
            let r = regs
                .iter()
                .find(|r| r.name == name)
                .ok_or(TargetError::MissingRegister(name))?;
            if r.bitsize != bits {
                return Err(TargetError::BadSize {
                    name,
                    bits: r.bitsize,
                    expected: bits,
                });
            }
            Ok(RegLoc {
                regnum: r.regnum,
                g_offset: offsets.get(&r.regnum).copied(),
            })
        };
        let find = |name: &'static str| find_sized(name, 64);
        Ok(RegisterMap {
            rax: find("rax")?,
            rcx: find("rcx")?,
            rdx: find("rdx")?,
            rsi: find("rsi")?,
            rdi: find("rdi")?,
            rsp: find("rsp")?,
            r8: find("r8")?,
            r9: find("r9")?,
            r10: find("r10")?,
            rip: find("rip")?,
            cr3: find("cr3")?,
            fs_base: find("fs_base")?,
            gs_base: find("gs_base")?,
            k_gs_base: find("k_gs_base")?,
            eflags: find_sized("eflags", 32)?,
        })
    }
}

/// A little-endian u64 at `loc` in a `g` reply; `None` if the reply is
/// shorter or the register is not in `g`.
pub fn from_g(g: &[u8], loc: RegLoc) -> Option<u64> {
    let off = loc.g_offset?;
    let bytes = g.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// A little-endian u32 at `loc` in a `g` reply (eflags).
pub fn from_g32(g: &[u8], loc: RegLoc) -> Option<u32> {
    let off = loc.g_offset?;
    let bytes = g.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of QEMU 10's x86-64 description (abridged: the real
    /// `i386-64bit.xml` has the same registers in this order, with flag and
    /// vector type definitions in between).
    const TARGET: &str = r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64</architecture><xi:include href="i386-64bit.xml"/></target>"#;
    const CORE: &str = r#"<?xml version="1.0"?>
<!-- Copyright (C) 2010-2017 Free Software Foundation, Inc. <reg name="bogus" bitsize="8"/> -->
<!DOCTYPE feature SYSTEM "gdb-target.dtd">
<feature name="org.gnu.gdb.i386.core">
  <flags id="x64_eflags" size="4">
    <field name="" start="22" end="31"/>
  </flags>
  <reg name="rax" bitsize="64" type="int64"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="rcx" bitsize="64" type="int64"/>
  <reg name="rdx" bitsize="64" type="int64"/>
  <reg name="rsi" bitsize="64" type="int64"/>
  <reg name="rdi" bitsize="64" type="int64"/>
  <reg name="rbp" bitsize="64" type="data_ptr"/>
  <reg name="rsp" bitsize="64" type="data_ptr"/>
  <reg name="r8" bitsize="64" type="int64"/>
  <reg name="r9" bitsize="64" type="int64"/>
  <reg name="r10" bitsize="64" type="int64"/>
  <reg name="r11" bitsize="64" type="int64"/>
  <reg name="r12" bitsize="64" type="int64"/>
  <reg name="r13" bitsize="64" type="int64"/>
  <reg name="r14" bitsize="64" type="int64"/>
  <reg name="r15" bitsize="64" type="int64"/>
  <reg name="rip" bitsize="64" type="code_ptr"/>
  <reg name="eflags" bitsize="32" type="x64_eflags"/>
  <reg name="cs" bitsize="32" type="int32"/>
  <reg name="ss" bitsize="32" type="int32"/>
  <reg name="ds" bitsize="32" type="int32"/>
  <reg name="es" bitsize="32" type="int32"/>
  <reg name="fs" bitsize="32" type="int32"/>
  <reg name="gs" bitsize="32" type="int32"/>
  <reg name="fs_base" bitsize="64" type="int64"/>
  <reg name="gs_base" bitsize="64" type="int64"/>
  <reg name='k_gs_base' bitsize='64' type='int64'/>
  <reg name="cr0" bitsize="64" type="i386_cr0"/>
  <reg name="cr2" bitsize="64" type="int64"/>
  <reg name="cr3" bitsize="64" type="i386_cr3"/>
</feature>"#;

    fn fetch(file: &str) -> Result<String, TargetError> {
        match file {
            "target.xml" => Ok(TARGET.to_string()),
            "i386-64bit.xml" => Ok(CORE.to_string()),
            f => Err(TargetError::Malformed(format!("no {f}"))),
        }
    }

    #[test]
    fn numbers_and_offsets_follow_document_order() {
        let regs = registers(&mut fetch).unwrap();
        assert_eq!(regs.len(), 30);
        assert!(regs.iter().all(|r| r.name != "bogus"), "comments skipped");
        let map = RegisterMap::new(&regs).unwrap();
        assert_eq!(
            map.rax,
            RegLoc {
                regnum: 0,
                g_offset: Some(0)
            }
        );
        assert_eq!(
            map.rsp,
            RegLoc {
                regnum: 7,
                g_offset: Some(56)
            }
        );
        assert_eq!(
            map.rip,
            RegLoc {
                regnum: 16,
                g_offset: Some(128)
            }
        );
        // eflags and six segment registers are 4 bytes each.
        assert_eq!(
            map.fs_base,
            RegLoc {
                regnum: 24,
                g_offset: Some(136 + 28)
            }
        );
        assert_eq!(map.k_gs_base.regnum, 26);
        assert_eq!(
            map.cr3,
            RegLoc {
                regnum: 29,
                g_offset: Some(136 + 28 + 40)
            }
        );
        let mut g = vec![0u8; 300];
        g[128..136].copy_from_slice(&0xffff_ffff_81c0_0080u64.to_le_bytes());
        assert_eq!(from_g(&g, map.rip), Some(0xffff_ffff_81c0_0080));
        assert_eq!(from_g(&g[..130], map.rip), None);
    }

    #[test]
    fn regnum_attributes_and_gaps() {
        let xml = r#"<target><reg name="a" bitsize="64"/><reg name="b" bitsize="64" regnum="5"/><reg name="c" bitsize="32"/></target>"#;
        let regs = registers(&mut |_| Ok(xml.to_string())).unwrap();
        let nums: Vec<(String, u32)> = regs.iter().map(|r| (r.name.clone(), r.regnum)).collect();
        assert_eq!(
            nums,
            vec![("a".into(), 0), ("b".into(), 5), ("c".into(), 6)]
        );
    }

    #[test]
    fn missing_or_odd_registers_are_named() {
        let xml = r#"<reg name="rax" bitsize="64"/>"#;
        let regs = registers(&mut |_| Ok(xml.to_string())).unwrap();
        assert_eq!(
            RegisterMap::new(&regs).unwrap_err(),
            TargetError::MissingRegister("rcx")
        );
        let xml = CORE.replace(r#"name="cr3" bitsize="64""#, r#"name="cr3" bitsize="32""#);
        let regs = registers(&mut |_| Ok(xml.clone())).unwrap();
        assert_eq!(
            RegisterMap::new(&regs).unwrap_err(),
            TargetError::BadSize {
                name: "cr3",
                bits: 32,
                expected: 64
            }
        );
    }

    #[test]
    fn include_cycles_and_junk_terminate() {
        let xml = r#"<xi:include href="target.xml"/><reg name="x" bitsize="8"/>"#;
        assert_eq!(registers(&mut |_| Ok(xml.to_string())).unwrap().len(), 1);
        let mut n = 0;
        let err = registers(&mut |_| {
            n += 1;
            Ok(format!(r#"<xi:include href="f{n}.xml"/>"#))
        });
        assert!(err.is_err());
        for junk in [
            "<",
            "<reg",
            "<!-- ",
            "<reg name=\"a\" bitsize=\"x\"/>",
            "<reg bitsize=\"8\"/>",
            "<reg name=a bitsize=8/>",
        ] {
            assert!(scan(junk).is_err(), "{junk}");
        }
        assert_eq!(scan("no tags at all").unwrap(), vec![]);
    }

    proptest::proptest! {
        #[test]
        fn scan_never_panics(s in "\\PC{0,400}") {
            let _ = scan(&s);
            let _ = attr(&s, "name");
        }
    }
}
