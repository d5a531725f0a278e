//! `/proc/PID/maps` parsing.

use crate::error::AttachError;
use std::path::{Path, PathBuf};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address of the mapping.
    pub start: u64,
    /// One past its last address (`end - start` is its length).
    pub end: u64,
    /// `r` in the permissions.
    pub read: bool,
    /// `w` in the permissions.
    pub write: bool,
    /// `x` in the permissions.
    pub exec: bool,
    /// Offset in the file of the byte mapped at `start`.
    pub offset: u64,
    /// `(major, minor)` of the device holding the file.
    pub dev: (u32, u32),
    /// The file's inode (0 for anonymous mappings); with `dev`, identifies the file even when
    /// the path is seen differently from another mount namespace.
    pub inode: u64,
    /// The file (or `[stack]`, `[heap]`, ... or empty).
    pub path: String,
}

impl MapEntry {
    /// Whether the mapping is backed by a regular file (not anonymous, not `[..]`, not deleted).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/') && !self.path.ends_with(" (deleted)")
    }

    /// Whether `addr` lies in `start..end`.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// The file name part of the path.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// `"self"` or the decimal pid, as used under `/proc`.
pub fn proc_dir(pid: Option<u32>) -> PathBuf {
    match pid {
        None => PathBuf::from("/proc/self"),
        Some(p) => PathBuf::from(format!("/proc/{p}")),
    }
}

/// Reads and parses `/proc/PID/maps` (`None` = this process).
pub fn read_maps(pid: Option<u32>) -> Result<Vec<MapEntry>, AttachError> {
    let path = proc_dir(pid).join("maps");
    let text = std::fs::read_to_string(&path).map_err(|source| AttachError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(parse_maps(&text))
}

/// Parses the text of a maps file, skipping malformed lines.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        offset,
        dev: (
            u32::from_str_radix(maj, 16).ok()?,
            u32::from_str_radix(min, 16).ok()?,
        ),
        inode,
        path,
    })
}

/// Path under which the file `path` of process `pid` can be opened from here (through
/// `/proc/PID/root`, so files of processes in other mount namespaces are found too).
pub fn host_path(pid: Option<u32>, path: &str) -> PathBuf {
    match pid {
        None => PathBuf::from(path),
        Some(p) if p == std::process::id() => PathBuf::from(path),
        Some(_) => {
            let mut root = proc_dir(pid).join("root");
            root.push(Path::new(path).strip_prefix("/").unwrap_or(Path::new(path)));
            root
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a01000 r-xp 00001000 fe:01 1234 /usr/bin/true\n\
             7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]\n\
             7f0000000000-7f0000001000 rw-p 00000000 00:00 0\n",
        );
        assert_eq!(m.len(), 3);
        assert!(m[0].exec && !m[0].write && m[0].offset == 0x1000 && m[0].dev == (0xfe, 1));
        assert_eq!(m[0].file_name(), "true");
        assert!(m[0].is_file() && !m[1].is_file() && !m[2].is_file());
        assert_eq!(m[1].path, "[stack]");
    }
}
