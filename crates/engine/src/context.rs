//! Context images: a terminal's settings, content-addressed like every image.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strata_proto::{TerminalContext, WinSize};
use strata_store::{ImageKind, ImageRecord};

use crate::{Engine, Error, ARCH, OS};

/// The settings of one terminal, as stored in its context image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContextSettings {
    pub term: String,
    pub rows: u16,
    pub cols: u16,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl ContextSettings {
    /// The settings of the terminal this process runs in (or sane defaults).
    pub fn from_terminal(size: Option<WinSize>) -> ContextSettings {
        let size = size.unwrap_or_default();
        let timezone = std::env::var("TZ").ok().filter(|s| !s.is_empty()).or_else(|| {
            std::fs::read_to_string("/etc/timezone").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
        });
        let locale = std::env::var("LC_ALL")
            .or_else(|_| std::env::var("LANG"))
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "C.UTF-8".into());
        ContextSettings {
            term: std::env::var("TERM").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "xterm-256color".into()),
            rows: size.rows,
            cols: size.cols,
            timezone,
            locale: Some(locale),
            env: BTreeMap::new(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(format!("context: {m}")));
        if self.term.is_empty()
            || self.term.len() > 64
            || !self.term.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            return bad(format!("terminal type {:?} is not valid", self.term));
        }
        if !(1..=1000).contains(&self.rows) || !(1..=1000).contains(&self.cols) {
            return bad(format!("terminal size {}x{} is out of range 1..1000", self.cols, self.rows));
        }
        if let Some(tz) = &self.timezone {
            if tz.is_empty()
                || tz.contains("..")
                || !tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
            {
                return bad(format!("time zone {tz:?} is not a zone name like Europe/Paris"));
            }
        }
        if let Some(l) = &self.locale {
            if l.is_empty() || !l.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) {
                return bad(format!("locale {l:?} is not a locale name like C.UTF-8"));
            }
        }
        for k in self.env.keys() {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return bad(format!("environment name {k:?} is not valid"));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return bad("environment values must not contain NUL".into());
        }
        Ok(())
    }

    /// What the agent applies, with the current time.
    pub fn to_terminal_context(&self) -> TerminalContext {
        TerminalContext {
            term: self.term.clone(),
            size: WinSize { rows: self.rows, cols: self.cols },
            timezone: self.timezone.clone(),
            locale: self.locale.clone(),
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            unix_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

impl Engine {
    /// Stores the settings as a context image, reusing an identical one.
    ///
    /// # Errors
    /// If the settings are invalid or the store fails.
    pub fn context_image(&self, settings: &ContextSettings) -> Result<ImageRecord, Error> {
        settings.validate()?;
        let json = serde_json::to_vec(settings).expect("settings serialize");
        let recipe = strata_store::sha256_hex(&json);
        if let Some(rec) = self.usable(ImageKind::Context, &recipe)? {
            return Ok(rec);
        }
        let blob = self.store.ingest_bytes(&json)?;
        let rec = ImageRecord::new(
            ImageKind::Context,
            None,
            OS,
            ARCH,
            None,
            &recipe,
            BTreeMap::from([("context".to_string(), blob)]),
            BTreeMap::new(),
            json.len() as u64,
        );
        self.store.insert_image(&rec)?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ContextSettings {
        ContextSettings {
            term: "xterm".into(),
            rows: 24,
            cols: 80,
            timezone: Some("Europe/Paris".into()),
            locale: Some("C.UTF-8".into()),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn settings_are_validated() {
        assert!(ok().validate().is_ok());
        type Mutation = Box<dyn Fn(&mut ContextSettings)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.rows = 0), "size"),
            (Box::new(|s| s.cols = 5000), "size"),
            (Box::new(|s| s.timezone = Some("../../etc/passwd".into())), "time zone"),
            (Box::new(|s| s.term = "x term".into()), "terminal type"),
            (Box::new(|s| s.locale = Some("en US".into())), "locale"),
            (
                Box::new(|s| {
                    s.env.insert("A=B".into(), "c".into());
                }),
                "environment",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = ok();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
