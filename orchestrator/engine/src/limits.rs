//! Bounds on what one runbook may cost to parse, validate and plan.
//!
//! A runbook can arrive from anyone who may call the API, and a run that is
//! stored is planned again on every restart: a small hostile file must not be
//! able to exhaust the stack, the memory or the CPU of `ferry serve`. The
//! defaults are far above any real runbook (a few hundred steps, a few KB) and
//! the orchestrator may pass stricter ones.

/// Bounds checked by `runbook::parse_with` and `plan::plan_with`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Size of the runbook text in bytes.
    pub max_bytes: usize,
    /// Nesting of YAML mappings and lists, and of `(` and `!` in an expression.
    pub max_depth: usize,
    /// Steps after `for_each` is expanded (also the steps a runbook may list).
    pub max_steps: usize,
    /// Items one `for_each` may expand to.
    pub max_for_each_items: usize,
    /// Dependencies between expanded steps (a step with N items that needs
    /// a step with M items counts N × M).
    pub max_dependencies: usize,
    /// Diagnostics reported for one runbook; the rest are counted.
    pub max_diagnostics: usize,
}

impl Limits {
    /// The defaults: 2 MiB, 64 levels, 10,000 expanded steps, 10,000 items,
    /// 1,000,000 dependencies, 100 diagnostics.
    pub const DEFAULT: Limits = Limits {
        max_bytes: 2 << 20,
        max_depth: 64,
        max_steps: 10_000,
        max_for_each_items: 10_000,
        max_dependencies: 1_000_000,
        max_diagnostics: 100,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}
