//! Assembling the guest's root tree from unpacked packages, and proving it
//! complete: every ELF file's interpreter and DT_NEEDED libraries must be in
//! the tree.
//!
//! The tree uses the merged-/usr layout (`/bin` → `usr/bin`, ...). bookworm's
//! packages still ship files under `/bin` and `/lib`, so paths are mapped as
//! they are installed.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use object::read::elf::{Dyn, FileHeader, ProgramHeader};

use crate::error::{IoContext, LabError, Result};

/// Top-level directories that are symlinks into `/usr` in the image.
const MERGED: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// Paths (relative, after /usr merging) not worth shipping to a test guest.
const STRIP: [&str; 12] = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/menu",
    "usr/share/common-licenses",
    "usr/share/gdb",
    "usr/lib/x86_64-linux-gnu/gconv",
    "etc/cron.daily",
];

/// Creates the skeleton: merged-/usr symlinks and the mount points init uses.
pub fn skeleton(root: &Path) -> Result<()> {
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "home/user",
        "var/tmp",
        "var/log",
        "mnt",
    ] {
        std::fs::create_dir_all(root.join(d)).at(root.join(d))?;
    }
    for d in MERGED {
        let link = root.join(d);
        std::os::unix::fs::symlink(format!("usr/{d}"), &link).at(&link)?;
    }
    for (d, mode) in [("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700)] {
        let p = root.join(d);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).at(&p)?;
    }
    Ok(())
}

/// Where a package path lands in the merged tree, or `None` if stripped.
fn map_path(rel: &Path) -> Option<PathBuf> {
    let mut comps = rel.components();
    let first = comps.next()?.as_os_str().to_str()?.to_string();
    let mapped = if MERGED.contains(&first.as_str()) {
        Path::new("usr").join(rel)
    } else {
        rel.to_path_buf()
    };
    if STRIP.iter().any(|s| mapped.starts_with(s)) {
        return None;
    }
    Some(mapped)
}

/// Copies an unpacked package (`dpkg-deb -x` output) into the tree. Later
/// packages overwrite earlier ones' files.
pub fn install_package(pkg_root: &Path, root: &Path) -> Result<()> {
    install_dir(pkg_root, pkg_root, root)
}

fn install_dir(pkg_root: &Path, dir: &Path, root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let src = entry.path();
        let rel = src
            .strip_prefix(pkg_root)
            .expect("under pkg root")
            .to_path_buf();
        let Some(mapped) = map_path(&rel) else {
            continue;
        };
        let dst = root.join(&mapped);
        let ft = entry.file_type().at(&src)?;
        if ft.is_dir() {
            // A directory at the top of the merged set is already a symlink.
            if !dst.exists() {
                std::fs::create_dir_all(&dst).at(&dst)?;
            }
            install_dir(pkg_root, &src, root)?;
        } else if ft.is_symlink() {
            let mut target = std::fs::read_link(&src).at(&src)?;
            if target.is_relative() && mapped != rel {
                // Relative to the old location, which moved under /usr:
                // make it absolute so it still points at the same file.
                let parent = Path::new("/").join(rel.parent().unwrap_or(Path::new("")));
                target = normalize(&parent.join(&target));
            }
            remove_if_present(&dst)?;
            std::os::unix::fs::symlink(&target, &dst).at(&dst)?;
        } else if ft.is_file() {
            remove_if_present(&dst)?;
            std::fs::copy(&src, &dst).at(&dst)?;
        }
    }
    Ok(())
}

fn remove_if_present(p: &Path) -> Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).at(p),
        Ok(_) => std::fs::remove_file(p).at(p),
        Err(_) => Ok(()),
    }
}

/// Lexically normalises an absolute path (`/a/b/../c` → `/a/c`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Writes a file into the tree with the given mode, creating parent dirs.
pub fn put_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    remove_if_present(&p)?;
    std::fs::write(&p, data).at(&p)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).at(&p)
}

/// Creates `(link, target)` symlinks whose target exists and whose link
/// does not (what update-alternatives does on a real system).
pub fn alternatives(root: &Path, links: &[(&str, &str)]) -> Result<()> {
    for (link, target) in links {
        let dst = root.join(link);
        let target_host = dst.parent().unwrap_or(root).join(target);
        if target_host.exists() && dst.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(target, &dst).at(&dst)?;
        }
    }
    Ok(())
}

/// Links every busybox applet that no real package provides to busybox.
/// `applets` is `busybox --list-full` output (`usr/bin/awk`, `sbin/ifconfig`, ...).
pub fn busybox_links(root: &Path, applets: &str) -> Result<usize> {
    let mut n = 0;
    // Applets at the top level (`linuxrc`) are not wanted.
    for line in applets.lines().map(str::trim).filter(|l| l.contains('/')) {
        let Some(mapped) = map_path(Path::new(line)) else {
            continue;
        };
        let dst = root.join(&mapped);
        if dst.symlink_metadata().is_ok() {
            continue; // coreutils, bash... win: the guest runs real glibc programs.
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        std::os::unix::fs::symlink("/usr/bin/busybox", &dst).at(&dst)?;
        n += 1;
    }
    Ok(n)
}

/// Follows `guest_path` (absolute, as the guest sees it) through symlinks
/// inside `root`. Returns the host path of the final file if it exists.
pub fn resolve_in_root(root: &Path, guest_path: &Path) -> Option<PathBuf> {
    let mut pending: Vec<PathBuf> = vec![guest_path.to_path_buf()];
    let mut hops = 0;
    let mut cur = PathBuf::from("/");
    'outer: while let Some(path) = pending.pop() {
        let comps: Vec<Component> = path.components().collect();
        for (i, c) in comps.iter().enumerate() {
            match c {
                Component::RootDir => cur = PathBuf::from("/"),
                Component::ParentDir => {
                    cur.pop();
                }
                Component::CurDir | Component::Prefix(_) => {}
                Component::Normal(n) => {
                    let next = cur.join(n);
                    let host = root.join(next.strip_prefix("/").ok()?);
                    let meta = host.symlink_metadata().ok()?;
                    if meta.file_type().is_symlink() {
                        hops += 1;
                        if hops > 40 {
                            return None;
                        }
                        let target = std::fs::read_link(&host).ok()?;
                        let rest: PathBuf = comps[i + 1..].iter().collect();
                        let joined = if target.is_absolute() {
                            target
                        } else {
                            cur.join(target)
                        };
                        pending.push(joined.join(rest));
                        continue 'outer;
                    }
                    cur = next;
                }
            }
        }
    }
    let host = root.join(cur.strip_prefix("/").ok()?);
    host.exists().then_some(host)
}

/// What the dynamic loader needs for one ELF file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfNeeds {
    pub interp: Option<String>,
    pub needed: Vec<String>,
    pub search: Vec<String>,
}

/// Reads PT_INTERP, DT_NEEDED and DT_RUNPATH/DT_RPATH of a 64-bit ELF
/// executable or shared object. `None` for other files (scripts, `.ko`s).
pub fn elf_needs(data: &[u8]) -> Option<ElfNeeds> {
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let e_type = header.e_type(endian);
    if e_type != object::elf::ET_EXEC && e_type != object::elf::ET_DYN {
        return None;
    }
    let mut needs = ElfNeeds::default();
    for ph in header.program_headers(endian, data).ok()? {
        if let Ok(Some(interp)) = ph.interpreter(endian, data) {
            needs.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).ok()?;
    if let Ok(Some((dyns, link))) = sections.dynamic(endian, data) {
        let strings = sections.strings(endian, data, link).ok()?;
        for d in dyns {
            let tag = d.d_tag(endian) as u32;
            let Ok(s) = d.string(endian, strings) else {
                continue;
            };
            let s = String::from_utf8_lossy(s).into_owned();
            match tag {
                object::elf::DT_NEEDED => needs.needed.push(s),
                object::elf::DT_RUNPATH | object::elf::DT_RPATH => {
                    needs.search.extend(s.split(':').map(str::to_string))
                }
                _ => {}
            }
        }
    }
    Some(needs)
}

/// Default library directories of the x86-64 glibc loader in Debian.
const LIB_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
];

/// Checks that every ELF file in the tree can be loaded: its interpreter and
/// DT_NEEDED libraries resolve inside the tree. Returns how many ELF files
/// were checked; the error names every missing piece.
pub fn check_elf_deps(root: &Path) -> Result<usize> {
    let mut files = Vec::new();
    walk_files(root, root, &mut files)?;
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let mut checked = 0;
    for rel in files {
        if rel.starts_with("usr/lib/modules") {
            continue;
        }
        let host = root.join(&rel);
        let Ok(data) = std::fs::read(&host) else {
            continue;
        };
        if !data.starts_with(b"\x7fELF") {
            continue;
        }
        let Some(needs) = elf_needs(&data) else {
            continue;
        };
        checked += 1;
        let guest = Path::new("/").join(&rel);
        let origin = guest
            .parent()
            .unwrap_or(Path::new("/"))
            .to_string_lossy()
            .into_owned();
        if let Some(interp) = &needs.interp {
            if resolve_in_root(root, Path::new(interp)).is_none() {
                missing.insert(format!("/{} needs interpreter {interp}", rel.display()));
            }
        }
        for lib in &needs.needed {
            let found = if lib.contains('/') {
                resolve_in_root(root, Path::new(lib)).is_some()
            } else {
                needs
                    .search
                    .iter()
                    .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
                    .chain(LIB_DIRS.iter().map(|d| d.to_string()))
                    .any(|d| resolve_in_root(root, &Path::new(&d).join(lib)).is_some())
            };
            if !found {
                missing.insert(format!("/{} needs {lib}", rel.display()));
            }
        }
    }
    if missing.is_empty() {
        Ok(checked)
    } else {
        Err(LabError::MissingLibraries(
            missing.into_iter().collect::<Vec<_>>().join(", "),
        ))
    }
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let ft = entry.file_type().at(&path)?;
        if ft.is_dir() {
            walk_files(root, &path, out)?;
        } else if ft.is_file() {
            out.push(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    Ok(())
}

/// Total bytes of regular files under `dir`.
pub fn tree_size(dir: &Path) -> u64 {
    let mut files = Vec::new();
    if walk_files(dir, dir, &mut files).is_err() {
        return 0;
    }
    files
        .iter()
        .filter_map(|f| dir.join(f).metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_merged_usr_and_strips_docs() {
        assert_eq!(
            map_path(Path::new("bin/bash")),
            Some(PathBuf::from("usr/bin/bash"))
        );
        assert_eq!(
            map_path(Path::new("lib64/ld.so")),
            Some(PathBuf::from("usr/lib64/ld.so"))
        );
        assert_eq!(map_path(Path::new("usr/share/doc/x")), None);
        assert_eq!(map_path(Path::new("etc/x")), Some(PathBuf::from("etc/x")));
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("lab-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        skeleton(&dir).unwrap();
        std::fs::create_dir_all(dir.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::write(dir.join("usr/lib/x86_64-linux-gnu/ld.so.2"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld.so.2",
            dir.join("usr/lib64/ld.so.2"),
        )
        .unwrap();
        let got = resolve_in_root(&dir, Path::new("/lib64/ld.so.2")).unwrap();
        assert_eq!(got, dir.join("usr/lib/x86_64-linux-gnu/ld.so.2"));
        assert!(resolve_in_root(&dir, Path::new("/lib64/nope")).is_none());
        // A relative link that escapes upwards stays inside the root.
        std::os::unix::fs::symlink("../../../../../../usr/lib64/ld.so.2", dir.join("usr/bin/x"))
            .unwrap();
        assert!(resolve_in_root(&dir, Path::new("/bin/x")).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_needs_of_a_host_binary() {
        let data = std::fs::read("/bin/sh").unwrap();
        let needs = elf_needs(&data).unwrap();
        assert!(needs.interp.unwrap().contains("ld-linux"));
        assert!(needs.needed.iter().any(|n| n == "libc.so.6"));
    }
}
