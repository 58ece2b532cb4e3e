//! What each step of an `agora run` costs: with `AGORA_RUN_STEPS=1` in its environment the run
//! prints, on stderr at its end, the time from the command's start to each step it passed
//! (module upload, capacity check, subscription, first offer, launch, RUNNING, the end,
//! output drained). BENCHMARKS.md's CLI latency breakdown is read off these lines.

use std::time::Instant;

/// The environment variable that turns the step times on.
pub const ENV: &str = "AGORA_RUN_STEPS";

/// Step times of one run (empty and free when the variable is not set).
#[derive(Debug)]
pub struct Steps {
    start: Instant,
    on: bool,
    marks: Vec<(&'static str, Instant)>,
}

impl Steps {
    /// Starts the clock (now: the command's start).
    pub fn from_env() -> Steps {
        Steps {
            start: Instant::now(),
            on: std::env::var_os(ENV).is_some_and(|v| v != "0"),
            marks: Vec::new(),
        }
    }

    /// Notes that `step` was reached, the first time only.
    pub fn mark(&mut self, step: &'static str) {
        if self.on && !self.marks.iter().any(|(s, _)| *s == step) {
            self.marks.push((step, Instant::now()));
        }
    }

    /// The line printed at the end: each step's time since the start and since the step before.
    pub fn line(&self) -> Option<String> {
        if !self.on {
            return None;
        }
        let mut prev = self.start;
        let parts: Vec<String> = self
            .marks
            .iter()
            .map(|(step, at)| {
                let s = format!(
                    "{step} {:.2} ms (+{:.2})",
                    (*at - self.start).as_secs_f64() * 1e3,
                    (*at - prev).as_secs_f64() * 1e3
                );
                prev = *at;
                s
            })
            .collect();
        Some(format!("agora: steps: {}", parts.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_kept_once_in_order_and_only_when_asked() {
        let mut on = Steps { start: Instant::now(), on: true, marks: Vec::new() };
        on.mark("subscribed");
        on.mark("offer");
        on.mark("subscribed");
        let line = on.line().expect("on");
        assert!(line.starts_with("agora: steps: subscribed "), "{line}");
        assert_eq!(line.matches("subscribed").count(), 1, "{line}");
        assert!(line.contains(", offer "), "{line}");
        let mut off = Steps { start: Instant::now(), on: false, marks: Vec::new() };
        off.mark("subscribed");
        assert!(off.line().is_none());
        assert!(off.marks.is_empty());
    }
}
