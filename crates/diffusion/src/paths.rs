//! Guest paths, lexically: records carry paths as the process passed them
//! (possibly relative to its working directory), while file identities
//! carry the absolute path the kernel rebuilt. Symlinks are not resolved
//! (the next file identity of the object corrects a name).

/// Longest path the engine keeps (PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// `/a/./b//c/../d` -> `/a/b/d`; `None` for a relative or too long path.
pub fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') || path.len() > 2 * MAX_PATH {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let out = format!("/{}", parts.join("/"));
    (out.len() <= MAX_PATH).then_some(out)
}

/// `path` as seen from directory `cwd` (absolute paths stand alone).
pub fn resolve(cwd: Option<&str>, path: &str) -> Option<String> {
    if path.starts_with('/') {
        normalize(path)
    } else {
        normalize(&format!("{}/{path}", cwd?))
    }
}

/// The working directory a relative open implies: `open("b/c")` returning
/// `/root/a/b/c` means the cwd is `/root/a`. Only for plain relative paths
/// (no `..`: through a symlinked directory it would guess wrong).
pub fn cwd_from_open(relative: &str, absolute: &str) -> Option<String> {
    if relative.starts_with('/') || !absolute.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = relative
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    let rel = parts.join("/");
    let dir = absolute.strip_suffix(&rel)?.strip_suffix('/')?;
    Some(if dir.is_empty() {
        "/".to_string()
    } else {
        dir.to_string()
    })
}

/// What the kernel names a task after `execve(path)`: the last component,
/// at most 15 bytes (`TASK_COMM_LEN` - 1).
pub fn comm_of_exec(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let mut end = base.len().min(15);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    base[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_paths() {
        assert_eq!(normalize("/a/./b//c/../d").as_deref(), Some("/a/b/d"));
        assert_eq!(normalize("/..").as_deref(), Some("/"));
        assert_eq!(normalize("a/b"), None);
        assert_eq!(resolve(Some("/root"), "x").as_deref(), Some("/root/x"));
        assert_eq!(resolve(None, "x"), None);
        assert_eq!(resolve(None, "/x/").as_deref(), Some("/x"));
        assert_eq!(
            cwd_from_open("b/c", "/root/a/b/c").as_deref(),
            Some("/root/a")
        );
        assert_eq!(cwd_from_open("./c", "/c").as_deref(), Some("/"));
        assert_eq!(cwd_from_open("../c", "/c"), None);
        assert_eq!(cwd_from_open("c", "/root/xc"), None);
        assert_eq!(comm_of_exec("/usr/bin/cp"), "cp");
        assert_eq!(
            comm_of_exec("/x/a-very-long-program-name"),
            "a-very-long-pro"
        );
    }
}
