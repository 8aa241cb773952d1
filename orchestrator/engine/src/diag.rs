//! Diagnostics: one problem in a runbook, with where it is and what to do.

use serde::Serialize;
use std::fmt;

/// A position in a runbook file (1-based line and column).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn of(span: &marked_yaml::Span) -> Pos {
        span.start()
            .map(|m| Pos {
                line: m.line(),
                column: m.column(),
            })
            .unwrap_or_default()
    }
}

/// One problem found in a runbook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        let n = self.0.len();
        write!(f, "{n} problem{}", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Diagnostics {}

/// Collects diagnostics for one file, at most `max` of them: a runbook with
/// 100,000 mistakes gets the first ones and a count, not 100,000 messages.
#[derive(Debug)]
pub(crate) struct Sink {
    pub file: String,
    pub found: Vec<Diagnostic>,
    max: usize,
    dropped: usize,
}

impl Sink {
    pub fn new(file: &str, max: usize) -> Sink {
        Sink {
            file: file.to_owned(),
            found: Vec::new(),
            max: max.max(1),
            dropped: 0,
        }
    }

    pub fn error(&mut self, at: Pos, message: impl Into<String>, hint: Option<String>) {
        if self.found.len() >= self.max {
            self.dropped += 1;
            return;
        }
        self.found.push(Diagnostic {
            file: self.file.clone(),
            line: at.line,
            column: at.column,
            message: message.into(),
            hint,
        });
    }

    pub fn finish(mut self) -> Result<(), Diagnostics> {
        if self.found.is_empty() {
            return Ok(());
        }
        self.found.sort_by_key(|d| (d.line, d.column));
        self.found.dedup();
        if self.dropped > 0 {
            let last = self
                .found
                .last()
                .map(|d| (d.line, d.column))
                .unwrap_or((1, 1));
            self.found.push(Diagnostic {
                file: self.file.clone(),
                line: last.0,
                column: last.1,
                message: format!(
                    "and {} more problem{} not shown",
                    self.dropped,
                    if self.dropped == 1 { "" } else { "s" }
                ),
                hint: Some("fix the ones above and validate again".into()),
            });
        }
        Err(Diagnostics(self.found))
    }
}

/// Words longer than this get no suggestions: a typo hint for a 1 MB key is
/// not worth a 1 MB × N comparison.
const SUGGEST_MAX_LEN: usize = 64;

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    suggest_within(word, candidates, &mut 10_000_000)
}

/// [`suggest`] that spends at most `budget` comparison cells (each one is a
/// character pair), shared across calls, so hints for thousands of unknown
/// names against thousands of candidates stay bounded. With the budget
/// spent, no more hints are given.
pub fn suggest_within<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    budget: &mut usize,
) -> Option<&'a str> {
    let wlen = word.chars().count();
    if wlen > SUGGEST_MAX_LEN {
        return None;
    }
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let clen = c.chars().count();
        let allowed = (clen.max(wlen) / 3).max(1);
        // The distance is at least the difference in length.
        if clen > SUGGEST_MAX_LEN || clen.abs_diff(wlen) > allowed {
            continue;
        }
        let cost = (wlen + 1) * (clen + 1);
        if *budget < cost {
            break;
        }
        *budget -= cost;
        let d = distance(word, c);
        if d <= allowed && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal string alignment distance (Levenshtein plus adjacent swaps).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        let c = ["volume.restore", "instance.launch", "check.http"];
        assert_eq!(suggest("volume.restor", c), Some("volume.restore"));
        assert_eq!(suggest("chek.http", c), Some("check.http"));
        assert_eq!(suggest("dns.switch", c), None);
    }

    #[test]
    fn suggestions_stop_when_the_budget_is_spent() {
        let c = ["volume.restore", "instance.launch"];
        let mut budget = 1_000;
        assert_eq!(
            suggest_within("volume.restor", c, &mut budget),
            Some("volume.restore")
        );
        assert!(budget < 1_000);
        let mut none = 10;
        assert_eq!(suggest_within("volume.restor", c, &mut none), None);
        assert_eq!(suggest(&"x".repeat(100), ["x".repeat(99).as_str()]), None);
    }
}
