//! The tracker units the API keys file lets connect over TCP (its `imeis=` lists, read by
//! [`crate::keys_file::imeis`]), re-read with the keys (SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use tracing::{error, info};

use super::DeviceGate;
use crate::keys_file::imeis::ImeiList;
use crate::keys_file::parse_keys;
use crate::model::LocationUpdate;
use crate::model::Update as _;

/// The units the API keys file lets in, re-read with the keys.
pub struct KeyFileUnits {
    path: PathBuf,
    /// Swapped whole by a reload.
    list: RwLock<Arc<ImeiList>>,
}

impl KeyFileUnits {
    /// Reads the keys file's `imeis=` lists; a file that cannot be used is an error naming its line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let units = KeyFileUnits {
            path: path.to_owned(),
            list: RwLock::new(Arc::new(ImeiList::default())),
        };
        units.reload()?;
        Ok(units)
    }

    /// Reads the file again. One that cannot be used lets no unit in until a reload succeeds, as the keys then let
    /// no write in: the units it would keep may be ones just taken out.
    pub fn reload(&self) -> anyhow::Result<()> {
        let list = match self.read() {
            Ok(list) => list,
            Err(e) => {
                *self.list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ImeiList::default());
                error!(
                    file = %self.path.display(),
                    error = format!("{e:#}"),
                    "the api keys file cannot be used: every tracker unit is refused until it is fixed and reloaded"
                );
                return Err(e);
            }
        };
        info!(units = list.len(), file = %self.path.display(), "tracker units the api keys let in");
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        Ok(())
    }

    fn read(&self) -> anyhow::Result<ImeiList> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("could not read the API keys file {}", self.path.display()))?;
        let cannot = || format!("the API keys file {} cannot be used", self.path.display());
        let keys = parse_keys(&text).with_context(cannot)?;
        let may_write_location = |name: &str| {
            keys.iter()
                .any(|k| k.name == name && k.may_write(LocationUpdate::STREAM))
        };
        ImeiList::parse(&text, may_write_location)
            .map_err(|e| anyhow::anyhow!("line {}: {}", e.line, e.message))
            .with_context(cannot)
    }
}

impl DeviceGate for KeyFileUnits {
    fn admits(&self, device_id: &str) -> bool {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner()).clone();
        list.key_of(device_id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn a_reload_takes_units_out_and_a_broken_file_lets_none_in() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let write = |text: String| std::fs::write(file.path(), text).unwrap();
        write(format!("trucks {HASH} streams=location imeis=1,2\n"));
        let units = KeyFileUnits::load(file.path()).unwrap();
        assert!(units.admits("1") && units.admits("2") && !units.admits("3"));
        write(format!("trucks {HASH} streams=location imeis=2\n"));
        units.reload().unwrap();
        assert!(!units.admits("1") && units.admits("2"));
        write(format!("trucks {HASH} streams=location imeis=2 colour=red\n"));
        assert!(units.reload().is_err());
        assert!(!units.admits("2"), "a file that cannot be used lets no unit in");
    }
}
