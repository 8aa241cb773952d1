//! The report as plain text, for a terminal.

use super::Report;
use std::fmt::Write as _;

/// The report as lines of text: verdicts first, then every step.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} {} of {}: {}", r.mode, r.run, r.runbook, r.status);
    if let Some(c) = &r.git_commit {
        let _ = writeln!(s, "  runbook {} at git commit {c}", r.file);
    }
    let verdict = |m: Option<bool>| match m {
        Some(true) => " (met)",
        Some(false) => " (MISSED)",
        None => "",
    };
    match r.rto_secs {
        Some(rto) => {
            let _ = writeln!(
                s,
                "  RTO {rto:.2} s{}{}",
                r.rto_objective_secs
                    .map(|o| format!(", objective {o:.0} s"))
                    .unwrap_or_default(),
                verdict(r.rto_met)
            );
        }
        None => {
            let _ = writeln!(s, "  RTO not reached (the stack was not verified)");
        }
    }
    for p in &r.points {
        let _ = writeln!(
            s,
            "  RPO {:.1} s{}{}: point {} of {} taken {}",
            p.rpo_secs,
            p.objective_secs
                .map(|o| format!(", objective {o:.0} s"))
                .unwrap_or_default(),
            verdict(p.met),
            &p.point[..p.point.len().min(12)],
            p.source,
            p.point_time
        );
    }
    let _ = writeln!(
        s,
        "  checks: {} passed, {} failed",
        r.checks_passed, r.checks_failed
    );
    let _ = writeln!(
        s,
        "  {:<22} {:<16} {:<10} {:>8} {:>9}",
        "step", "action", "status", "start", "duration"
    );
    for st in &r.steps {
        let _ = writeln!(
            s,
            "  {:<22} {:<16} {:<10} {:>8} {:>9}{}{}",
            format!("{}{}", st.id, if st.critical { " *" } else { "" }),
            st.uses,
            st.status,
            st.start_secs
                .map(|v| format!("{v:.2}s"))
                .unwrap_or_default(),
            st.duration_secs
                .map(|v| format!("{v:.2}s"))
                .unwrap_or_default(),
            st.undo
                .as_deref()
                .map(|u| format!("  [{u}]"))
                .unwrap_or_default(),
            st.error
                .as_deref()
                .map(|e| format!("\n      {e}"))
                .unwrap_or_default()
        );
    }
    if !r.critical_path.is_empty() {
        let sum: f64 = r
            .critical_path
            .iter()
            .map(|c| c.wait_secs + c.duration_secs)
            .sum();
        let waits: f64 = r.critical_path.iter().map(|c| c.wait_secs).sum();
        let _ = writeln!(
            s,
            "  critical path (*): {} = {sum:.2} s ({waits:.3} s of it scheduling)",
            r.critical_path
                .iter()
                .map(|c| format!("{} {:.2}s", c.id, c.duration_secs))
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    if let Some(t) = r.teardown_secs {
        let _ = writeln!(
            s,
            "  teardown {t:.2} s{}",
            if r.left_behind.is_empty() {
                String::new()
            } else {
                format!("; LEFT BEHIND: {}", r.left_behind.join(", "))
            }
        );
    }
    s
}
