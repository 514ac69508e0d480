//! Progress display for long work (image builds, downloads).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use strata_engine::Progress;

/// A spinner with the current step and elapsed time on a terminal; plain
/// lines otherwise.
pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}").expect("valid template"));
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Bar { bar, quiet }
    }

    /// Removes the spinner before the terminal is handed to a program.
    pub fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn step(&self, message: &str) {
        match &self.bar {
            Some(b) => b.set_message(message.to_string()),
            None if !self.quiet => eprintln!("strata: {message}"),
            None => {}
        }
    }

    fn done(&self, message: &str) {
        match &self.bar {
            Some(b) => b.println(format!("✓ {message}")),
            None if !self.quiet => eprintln!("strata: {message}"),
            None => {}
        }
    }
}
