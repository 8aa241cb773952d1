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
    match (r.downtime_secs, r.downtime_objective_secs) {
        (Some(d), o) => {
            let _ = writeln!(
                s,
                "  downtime {d:.2} s{}{}",
                o.map(|o| format!(", objective {o:.0} s"))
                    .unwrap_or_default(),
                verdict(r.downtime_met)
            );
        }
        (None, Some(_)) => {
            let _ = writeln!(
                s,
                "  downtime not measured (the service was not proven back)"
            );
        }
        (None, None) => {}
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
    if let Some(f) = &r.forecast {
        let _ = writeln!(
            s,
            "  predicted RTO {:.1} s, measured {}; drill cost predicted {}, at the table's prices with measured times {} (prices of {})",
            f.predicted_rto_secs,
            f.measured_rto_secs
                .map(|m| format!("{m:.1} s"))
                .unwrap_or_else(|| "not reached".into()),
            money(&f.currency, f.predicted_drill_cost),
            money(&f.currency, f.measured_drill_cost),
            f.prices_date
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

fn money(currency: &str, amount: f64) -> String {
    // An empty sum is -0.0.
    let amount = amount + 0.0;
    let sign = if currency == "USD" { "$" } else { "" };
    let unit = if currency == "USD" { "" } else { currency };
    if amount > 0.0 && amount < 0.0001 {
        format!("< {sign}0.0001{unit}")
    } else if amount > 0.0 && amount < 0.01 {
        format!("{sign}{amount:.4}{unit}")
    } else {
        format!("{sign}{amount:.2}{unit}")
    }
}

/// A plan's forecast: steps by wave with what they make and their predicted
/// time, then the predicted RTO and costs.
pub fn forecast(f: &crate::forecast::Forecast, waves: &[Vec<String>]) -> String {
    use crate::forecast::Basis;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan for {} on target {} ({}): {} steps in {} waves",
        f.runbook,
        f.target,
        f.target_type,
        f.steps.len(),
        waves.len()
    );
    let by_id: std::collections::BTreeMap<&str, &crate::forecast::StepForecast> =
        f.steps.iter().map(|s| (s.id.as_str(), s)).collect();
    for (i, w) in waves.iter().enumerate() {
        let _ = writeln!(s, "wave {}:", i + 1);
        for id in w {
            let Some(st) = by_id.get(id.as_str()) else {
                continue;
            };
            let basis = match st.basis {
                Basis::History => "history",
                Basis::MeasuredThroughput => "measured throughput",
                Basis::TableThroughput => "table throughput",
                Basis::Default => "default",
            };
            let cond = st
                .condition
                .as_deref()
                .map(|c| format!("  if {c}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {:<24} {:<18} ~{:.1} s ({basis}){cond}",
                st.id, st.uses, st.predicted_secs
            );
            if let Some(p) = &st.point {
                match (&p.id, &p.error) {
                    (Some(id), None) => {
                        let _ = writeln!(
                            s,
                            "      point {} = {} taken {} ({:.0} s ago), disk {} of {} bytes ({} hold data)",
                            p.reference,
                            &id[..12.min(id.len())],
                            p.time.as_deref().unwrap_or(""),
                            p.age_secs.unwrap_or(0.0),
                            p.disk.as_deref().unwrap_or("?"),
                            p.size.unwrap_or(0),
                            p.data_bytes.unwrap_or(0)
                        );
                    }
                    (_, Some(e)) => {
                        let _ = writeln!(s, "      point {}: {e}", p.reference);
                    }
                    _ => {}
                }
            }
            for r in &st.resources {
                let hourly = if r.hourly > 0.0 {
                    format!(", {}/h", money(&f.currency, r.hourly))
                } else {
                    String::new()
                };
                let _ = writeln!(s, "      makes {}: {}{hourly}", r.kind, r.detail);
            }
        }
    }
    let _ = writeln!(
        s,
        "predicted RTO: {:.1} s{}",
        f.predicted_rto_secs,
        if f.history_runs > 0 {
            format!(
                " (learnt from {} earlier runs on this target)",
                f.history_runs
            )
        } else {
            " (no earlier runs on this target: table and default figures)".into()
        }
    );
    if let Some(o) = f.rto_objective_secs {
        let _ = writeln!(s, "RTO objective: {o:.0} s");
    }
    let _ = writeln!(
        s,
        "predicted drill cost: {}",
        money(&f.currency, f.drill_cost)
    );
    for l in &f.drill_cost_lines {
        let _ = writeln!(s, "  {:<36} {}", l.what, money(&f.currency, l.amount));
    }
    match f.standby_month_cost {
        Some(c) => {
            let _ = writeln!(s, "standby, per month: {}", money(&f.currency, c));
            for l in &f.standby_cost_lines {
                let _ = writeln!(s, "  {:<36} {}", l.what, money(&f.currency, l.amount));
            }
        }
        None => {
            let _ = writeln!(
                s,
                "standby, per month: unknown (give the repository with -r)"
            );
        }
    }
    let _ = writeln!(
        s,
        "once running (after a failover): {}/h",
        money(&f.currency, f.running_hourly_cost)
    );
    let _ = writeln!(s, "prices: {} (as of {})", f.prices, f.prices_date);
    for n in &f.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}
