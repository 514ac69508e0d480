//! Progress display for long work (image builds, downloads).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use strata_engine::Progress;

/// A spinner with the current step and elapsed time on a terminal; plain
/// lines otherwise. Nothing is drawn until there is work to show.
pub struct Bar {
    bar: OnceLock<ProgressBar>,
    on_terminal: bool,
    quiet: bool,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        Bar { bar: OnceLock::new(), on_terminal: std::io::stderr().is_terminal(), quiet }
    }

    fn spinner(&self) -> Option<&ProgressBar> {
        if self.quiet || !self.on_terminal {
            return None;
        }
        Some(self.bar.get_or_init(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}").expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        }))
    }

    /// Removes the spinner before the terminal is handed to a program.
    pub fn clear(&self) {
        if let Some(b) = self.bar.get() {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn step(&self, message: &str) {
        match self.spinner() {
            Some(b) => b.set_message(message.to_string()),
            None if !self.quiet => eprintln!("strata: {message}"),
            None => {}
        }
    }

    fn done(&self, message: &str) {
        match self.spinner() {
            Some(b) => b.println(format!("✓ {message}")),
            None if !self.quiet => eprintln!("strata: {message}"),
            None => {}
        }
    }
}
