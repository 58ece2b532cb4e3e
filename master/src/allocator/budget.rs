//! The bounds of one allocation cycle: a backstop so that no demand can keep the core in one
//! cycle, or one slice of it.

/// Most grants (whole agents or demand slices) one allocation cycle makes: a backstop, so that
/// no demand can keep the core in one cycle (the demand itself is bounded on receipt, see
/// [`crate::validate`]); what is left is given in the next cycles.
pub const MAX_GRANTS_PER_CYCLE: usize = 100_000;
/// Longest an allocation cycle (one slice of a sliced cycle) may run, measured on the wall
/// clock (a backstop like [`MAX_GRANTS_PER_CYCLE`]: the core answers nobody while it
/// allocates).
pub const MAX_CYCLE_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// The bounds of one cycle (see [`MAX_GRANTS_PER_CYCLE`], [`MAX_CYCLE_TIME`]).
#[derive(Debug)]
pub(super) struct CycleBudget {
    grants_left: usize,
    deadline: Option<std::time::Instant>,
    pub(super) exhausted: bool,
}

impl Default for CycleBudget {
    fn default() -> Self {
        Self { grants_left: MAX_GRANTS_PER_CYCLE, deadline: None, exhausted: false }
    }
}

impl CycleBudget {
    pub(super) fn start(&mut self) {
        *self = Self { deadline: std::time::Instant::now().checked_add(MAX_CYCLE_TIME), ..Self::default() };
    }

    /// The next slice of a sliced cycle: the clock starts again (the limit bounds one step of
    /// the core), the grants left are the cycle's.
    pub(super) fn start_slice(&mut self) {
        self.deadline = std::time::Instant::now().checked_add(MAX_CYCLE_TIME);
        self.exhausted = self.grants_left == 0;
    }

    /// Takes one grant; false (for the rest of the cycle) once the budget is spent. The clock
    /// is read every 64 grants.
    pub(super) fn spend(&mut self) -> bool {
        if self.exhausted {
            return false;
        }
        self.grants_left = self.grants_left.saturating_sub(1);
        let late = self.grants_left.is_multiple_of(64)
            && self.deadline.is_some_and(|d| std::time::Instant::now() >= d);
        if self.grants_left == 0 || late {
            tracing::warn!(
                grants = MAX_GRANTS_PER_CYCLE - self.grants_left,
                "allocation cycle cut short (grant or time budget spent); the rest waits for the next cycle"
            );
            self.exhausted = true;
        }
        true
    }
}
