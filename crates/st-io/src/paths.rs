//! Where weightsmith reads and writes: regular files only, and outputs that never overlap an
//! input.
//!
//! Every file st-io reads is opened with [`open_regular`]: opened without blocking and checked
//! to be a regular file before a byte is read, so a named pipe, a device, a socket or a folder
//! in a file's place is an error naming it, never a hang. Every verb that writes resolves its
//! output and inputs with [`check_output`] before anything is created, renamed or removed.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// What a path is, in words, for errors.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading when it is a regular file (after symbolic links), else
/// [`Error::NotARegularFile`]. The open itself never blocks: it does not wait for a writer on
/// a named pipe.
pub fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => Error::NotARegularFile {
                path: path.to_path_buf(),
                kind: kind_of(&m),
            },
            _ => Error::io(path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotARegularFile {
            path: path.to_path_buf(),
            kind: kind_of(&meta),
        });
    }
    Ok(file)
}

/// Reads a whole regular file ([`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The canonical form of `path`, following symbolic links, also when its last components do
/// not exist yet (they are resolved against their nearest existing ancestor).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(path, e))?
            .join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest: Vec<Component> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(c) => {
                let mut out = c;
                for comp in rest.iter().rev() {
                    match comp {
                        Component::ParentDir => {
                            out.pop();
                        }
                        Component::CurDir => {}
                        other => out.push(other.as_os_str()),
                    }
                }
                return Ok(out);
            }
            Err(_) => {
                let (Some(parent), Some(last)) =
                    (existing.parent(), existing.components().next_back())
                else {
                    return Ok(absolute);
                };
                rest.push(last);
                existing = parent;
            }
        }
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir` (None where
/// unknown).
#[cfg(unix)]
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the right type, which
    // statvfs fills when it returns 0.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // A file system that reports no size at all (some FUSE mounts) says nothing about its
    // free space either.
    if stat.f_blocks == 0 {
        return None;
    }
    (stat.f_bavail as u64).checked_mul(stat.f_frsize as u64)
}

/// Names a folder may hold and still be a checkpoint folder `--force` may replace.
fn looks_like_checkpoint_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        ".safetensors",
        ".json",
        ".jinja",
        ".md",
        ".txt",
        ".model",
        ".tiktoken",
        ".gitattributes",
    ]
    .iter()
    .any(|ext| lower.ends_with(ext))
}

/// Refuses an output that is an input, lies inside one or contains one (each resolved, so two
/// spellings of one folder or a symbolic link to it are the same), with or without `replace`;
/// and, with `replace`, an existing output that is not a checkpoint folder or an empty one.
/// Call it before anything is created, renamed or removed.
pub fn check_output(out: &Path, inputs: &[&Path], replace: bool) -> Result<()> {
    let resolved_out = resolve(out)?;
    for input in inputs {
        let resolved_in = resolve(input)?;
        let how = if resolved_out == resolved_in {
            Some("is")
        } else if resolved_out.starts_with(&resolved_in) {
            Some("lies inside")
        } else if resolved_in.starts_with(&resolved_out) {
            Some("contains")
        } else {
            None
        };
        if let Some(how) = how {
            return Err(Error::OutputOverlapsInput {
                output: out.to_path_buf(),
                input: input.to_path_buf(),
                how,
            });
        }
    }
    if !replace {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if !meta.is_dir() {
        return Err(Error::NotAnOutputFolder {
            path: out.to_path_buf(),
            file: out.to_path_buf(),
            why: format!("it is {}, not a folder", kind_of(&meta)),
        });
    }
    let mut first: Option<PathBuf> = None;
    let mut checkpoint = false;
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let m = entry
            .path()
            .symlink_metadata()
            .map_err(|e| Error::io(entry.path(), e))?;
        first.get_or_insert_with(|| entry.path());
        if !m.is_file() {
            return Err(Error::NotAnOutputFolder {
                path: out.to_path_buf(),
                file: entry.path(),
                why: format!("it holds {}, which no checkpoint folder has", kind_of(&m)),
            });
        }
        if !looks_like_checkpoint_file(&name) {
            return Err(Error::NotAnOutputFolder {
                path: out.to_path_buf(),
                file: entry.path(),
                why: "it holds a file no checkpoint folder has".into(),
            });
        }
        checkpoint |= name == "config.json" || name.ends_with(".safetensors");
    }
    if let (Some(file), false) = (first, checkpoint) {
        return Err(Error::NotAnOutputFolder {
            path: out.to_path_buf(),
            file,
            why: "it holds files but neither config.json nor safetensors weights".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_named_pipe_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(
            e.contains("named pipe") && e.contains("model.safetensors"),
            "{e}"
        );
        assert!(started.elapsed().as_secs() < 1);
        let e = read_regular(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
    }

    #[test]
    fn two_spellings_of_one_folder_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir(&m).unwrap();
        std::os::unix::fs::symlink(&m, dir.path().join("link")).unwrap();
        let canon = resolve(&m).unwrap();
        for spelling in [
            dir.path().join("m/"),
            dir.path().join("m/."),
            dir.path().join("x/../m"),
            dir.path().join("link"),
            dir.path().join("m/../m"),
        ] {
            assert_eq!(resolve(&spelling).unwrap(), canon, "{}", spelling.display());
        }
        assert_eq!(
            resolve(&dir.path().join("m/new/../new2")).unwrap(),
            canon.join("new2")
        );
    }

    #[test]
    fn outputs_overlapping_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("config.json"), "{}").unwrap();
        for (out, how) in [
            (m.clone(), "is"),
            (m.join("out"), "lies inside"),
            (dir.path().to_path_buf(), "contains"),
        ] {
            for replace in [false, true] {
                let e = check_output(&out, &[&m], replace).unwrap_err().to_string();
                assert!(e.contains(how) && e.contains(&*m.to_string_lossy()), "{e}");
            }
        }
        assert!(check_output(&dir.path().join("other"), &[&m], true).is_ok());
    }

    #[test]
    fn force_replaces_only_checkpoint_folders() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert!(check_output(&out, &[], true).is_ok(), "an empty folder");
        std::fs::write(out.join("config.json"), "{}").unwrap();
        std::fs::write(out.join("model.safetensors"), "x").unwrap();
        assert!(check_output(&out, &[], true).is_ok());
        std::fs::write(out.join("Cargo.toml"), "").unwrap();
        let e = check_output(&out, &[], true).unwrap_err().to_string();
        assert!(e.contains("Cargo.toml"), "{e}");
        std::fs::remove_file(out.join("Cargo.toml")).unwrap();
        std::fs::create_dir(out.join(".git")).unwrap();
        let e = check_output(&out, &[], true).unwrap_err().to_string();
        assert!(e.contains(".git") && e.contains("folder"), "{e}");
    }
}
