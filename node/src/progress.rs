//! Progress bars for long operator work. Drawn on stderr only when it is a
//! terminal; scripts and tests see the final one-line summaries.

use indicatif::{ProgressBar, ProgressStyle};

fn bar(total: u64, what: &str, counts: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{msg:>10}} [{{bar:40}}] {counts} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar.set_message(what.to_owned());
    bar
}

/// A count of bytes whose total is not known ahead (a streamed backup).
pub fn bytes_streamed(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    let style = ProgressStyle::with_template("{msg:>10} {spinner} {bytes} {bytes_per_sec} {elapsed}");
    bar.set_style(style.expect("valid template"));
    bar.set_message(what.to_owned());
    bar
}

/// A bar over a number of items (bulk loads, log entries to catch up).
pub fn items(total: u64, what: &str) -> ProgressBar {
    bar(total, what, "{pos}/{len} {per_sec}")
}
