//! The state file: `<state_dir>/state.json`, written atomically and guarded
//! by a lock so that two controllers never share one state directory.
//!
//! A state file that cannot be read as this version's format is never
//! overwritten or moved: the controller refuses to start and says which file
//! and what is wrong, so no decision is lost. The operator repairs it, or
//! moves it aside to start over (every endpoint then gets its initial state).

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::{fs::DirBuilderExt as _, fs::OpenOptionsExt as _, io::AsRawFd as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{PersistedState, STATE_VERSION};

pub const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// How long `open` waits for another controller to release the directory.
const LOCK_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {op}: {cause}")]
    Io {
        path: PathBuf,
        op: &'static str,
        cause: std::io::Error,
    },
    #[error(
        "{path} is corrupt: {detail}. plink-ctl left it untouched and will not start with it, so that no decision is lost: repair the file, or move it aside to start with no saved decisions (endpoints then get their initial states again)"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} has state format version {found}, this plink-ctl reads version {expected}: run the plink-ctl that wrote it, or move the file aside to start over"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{path} is locked by another plink-ctl (pid in the file: {holder}); one controller per state directory"
    )]
    Locked { path: PathBuf, holder: String },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |cause| StateError::Io {
        path: path.to_owned(),
        op,
        cause,
    }
}

/// An open state directory. Holds an exclusive `flock` on `<dir>/lock` until
/// dropped.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: File,
}

impl StateStore {
    /// Creates the directory (mode 0700) if needed and locks it.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir, "creating the state directory"))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path, "opening the lock file"))?;
        // A controller being restarted may still be exiting: poll briefly
        // before calling the directory taken.
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a valid open fd.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            if Instant::now() >= deadline {
                let holder = fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(StateError::Locked {
                    path: lock_path,
                    holder: holder.trim().to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pid is informational, for the message above.
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state, or `None` when there is none yet.
    pub fn load(&self) -> Result<Option<PersistedState>, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(StateError::Corrupt {
                    path,
                    detail: "not UTF-8 text".into(),
                });
            }
            Err(e) => return Err(io(&path, "reading")(e)),
        };
        // Read the version first so that a newer format says so rather than
        // failing on an unknown field.
        #[derive(serde::Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let corrupt = |e: serde_json::Error| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        };
        let v: VersionOnly = serde_json::from_str(&text).map_err(corrupt)?;
        if !super::STATE_VERSIONS_READ.contains(&v.version) {
            return Err(StateError::Version {
                path,
                found: v.version,
                expected: STATE_VERSION,
            });
        }
        let mut state: PersistedState = serde_json::from_str(&text).map_err(corrupt)?;
        state.version = STATE_VERSION;
        Ok(Some(state))
    }

    /// Writes the state atomically: a temp file in the same directory,
    /// fsync, rename over the old file, fsync the directory. A crash leaves
    /// either the old or the new file, never a torn one.
    pub fn save(&self, state: &PersistedState) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let mut text = serde_json::to_vec_pretty(state).map_err(|e| StateError::Io {
            path: path.clone(),
            op: "encoding",
            cause: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp, "creating"))?;
        f.write_all(&text).map_err(io(&tmp, "writing"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path, "renaming the new state into place"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir, "fsync of the state directory"))?;
        Ok(())
    }
}
