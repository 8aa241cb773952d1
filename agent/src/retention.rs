//! Retention policies: which recovery points of one source a `ferry forget`
//! keeps. Pure computation, no IO; the caller lists the points, calls
//! [`apply`], shows the decisions and deletes what is not kept.
//!
//! The semantics are restic's `forget --keep-*` policies:
//!
//! * Points are ordered newest first (ties keep their input order).
//! * `last` keeps the N newest points.
//! * `hourly`, `daily`, `weekly`, `monthly` and `yearly` each keep the newest
//!   point of each of the N most recent buckets that hold a point at all. The
//!   buckets are calendar periods in UTC: hour (`YYYY-MM-DD HH`), day, ISO week
//!   (ISO week-numbering year and week), month and year. Empty periods do not
//!   count, so `daily = 7` over a source that backs up twice a week reaches back
//!   about three and a half weeks.
//! * As restic does since 0.16, a bucketed rule (or `last`) that still has
//!   counts left when it reaches the oldest point keeps that oldest point too,
//!   with the reason `"oldest daily"` and so on: a short history is never cut
//!   shorter than the policy allows.
//! * `within` keeps every point strictly newer than *the newest point's* time
//!   minus the duration. It is measured from the newest point, not from the
//!   clock, so a source that stopped backing up never loses its last points to
//!   the passage of time. (Unlike restic, which ignores points dated in the
//!   future when it looks for the newest one, this module never reads the clock;
//!   a caller that distrusts future timestamps filters them first.)
//! * A point is kept when any rule keeps it, and its [`Decision`] lists every
//!   rule that did, in the order `last`, `hourly`, `daily`, `weekly`, `monthly`,
//!   `yearly`, `within`.
//! * A count of `Some(0)` and a `within` of zero (or less) are the same as
//!   `None`: the rule is off.
//! * An empty policy (every rule off) is an error the caller reports before
//!   deleting anything; if it is applied anyway, [`apply`] keeps every point
//!   with the reason `"no policy"`, so a mistake never deletes data.
//!
//! Rules combine into tiers, which is how continuous protection thins its
//! points: `within = 1h, hourly = 24, daily = 7` keeps everything from the last
//! hour, then one point per hour for the last day, then one per day for the
//! last week.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

/// Reason for a point kept because the policy is empty.
const NO_POLICY: &str = "no policy";
/// Reason for a point kept by [`Policy::within`].
const WITHIN: &str = "within";

/// Which points of one source to keep. Every rule is optional; see the module
/// documentation for the semantics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Keep the N newest points.
    pub last: Option<u32>,
    /// Keep the newest point of each of the N most recent hours that have one.
    pub hourly: Option<u32>,
    /// Keep the newest point of each of the N most recent days that have one.
    pub daily: Option<u32>,
    /// Keep the newest point of each of the N most recent ISO weeks that have one.
    pub weekly: Option<u32>,
    /// Keep the newest point of each of the N most recent months that have one.
    pub monthly: Option<u32>,
    /// Keep the newest point of each of the N most recent years that have one.
    pub yearly: Option<u32>,
    /// Keep every point newer than the newest point's time minus this.
    pub within: Option<Duration>,
}

impl Policy {
    /// True when no rule is on: every count is `None` or `Some(0)` and `within`
    /// is `None` or not positive. `ferry forget` refuses such a policy.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|n| n.unwrap_or(0) == 0) && self.within_window().is_none()
    }

    /// Parses a `within` duration: one or more `<number><unit>` groups, each
    /// unit at most once, in any order, such as `36h`, `7d`, `2w`, `1y2mo3d` or
    /// `90min`. Units: `y` years, `mo` months, `w` weeks, `d` days, `h` hours,
    /// `min` minutes, `s` seconds. A bare `m` is refused: restic reads it as
    /// months and every other duration in Ferry (and humantime) as minutes, so
    /// either reading would surprise someone, and here a wrong guess deletes
    /// recovery points.
    ///
    /// A duration has no calendar, so a month counts as 31 days and a year as
    /// 366 days, the longest they can be: the window is never shorter than
    /// restic's calendar-based one and never deletes a point restic would keep.
    /// The total must be positive. Errors name the offending text.
    pub fn parse_within(s: &str) -> Result<Duration, String> {
        const UNITS: &str = "y (years), mo (months), w, d, h, min or s";
        let bad = |why: String| format!("invalid keep-within duration {s:?}: {why}");
        let text = s.trim();
        if text.is_empty() {
            return Err(bad(format!(
                "it is empty; expected something like 36h, 7d, 2w or 1y2m3d ({UNITS})"
            )));
        }
        let mut rest = text;
        let mut seen: Vec<&str> = Vec::new();
        let mut total: i64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad(format!("expected a number at {rest:?}")));
            }
            let (number, after) = rest.split_at(digits);
            let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
            if letters == 0 {
                return Err(bad(format!("the number {number} needs a unit: {UNITS}")));
            }
            let (unit, after) = after.split_at(letters);
            let unit_seconds: i64 = match unit {
                "y" => 366 * 86_400,
                "mo" => 31 * 86_400,
                "m" => {
                    return Err(bad(format!(
                        "{number}m is ambiguous: write {number}mo for months or {number}min for minutes"
                    )));
                }
                "w" => 7 * 86_400,
                "d" => 86_400,
                "h" => 3_600,
                "min" => 60,
                "s" => 1,
                _ => {
                    return Err(bad(format!("unknown unit {unit:?} (use {UNITS})")));
                }
            };
            if seen.contains(&unit) {
                return Err(bad(format!("the unit {unit:?} appears twice")));
            }
            seen.push(unit);
            let too_long = || bad(format!("{number}{unit} is too long"));
            let count: i64 = number.parse().map_err(|_| too_long())?;
            total = count
                .checked_mul(unit_seconds)
                .and_then(|part| total.checked_add(part))
                .ok_or_else(too_long)?;
            rest = after;
        }
        if total == 0 {
            return Err(bad("the duration must be longer than zero".to_owned()));
        }
        Duration::try_seconds(total).ok_or_else(|| bad("the duration is too long".to_owned()))
    }

    fn counts(&self) -> [Option<u32>; 6] {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
    }

    /// `within` if it is on (positive).
    fn within_window(&self) -> Option<Duration> {
        self.within.filter(|d| *d > Duration::zero())
    }
}

/// What [`apply`] decided about one point.
#[derive(Debug, PartialEq)]
pub struct Decision<'a, T> {
    /// The point, borrowed from the slice given to [`apply`].
    pub item: &'a T,
    /// Whether the policy keeps it.
    pub keep: bool,
    /// Every rule that keeps it, in the order `last`, `hourly`, `daily`,
    /// `weekly`, `monthly`, `yearly`, `within`; empty when not kept. Values:
    /// `"last"`, `"hourly"`, `"daily"`, `"weekly"`, `"monthly"`, `"yearly"`,
    /// `"within"`, `"oldest hourly"` … `"oldest yearly"` (the oldest point,
    /// kept because that rule had counts left) and `"no policy"`.
    pub reasons: Vec<&'static str>,
}

impl<T> Clone for Decision<'_, T> {
    fn clone(&self) -> Self {
        Decision {
            item: self.item,
            keep: self.keep,
            reasons: self.reasons.clone(),
        }
    }
}

/// One counted rule while [`apply`] walks the points.
struct Counter {
    left: u32,
    bucket: fn(&DateTime<Utc>, usize) -> i64,
    previous: Option<i64>,
    reason: &'static str,
    oldest_reason: &'static str,
}

fn position(_: &DateTime<Utc>, nr: usize) -> i64 {
    nr as i64
}

fn hour(t: &DateTime<Utc>, _: usize) -> i64 {
    day(t, 0) * 100 + i64::from(t.hour())
}

fn day(t: &DateTime<Utc>, _: usize) -> i64 {
    month(t, 0) * 100 + i64::from(t.day())
}

fn iso_week(t: &DateTime<Utc>, _: usize) -> i64 {
    let week = t.iso_week();
    i64::from(week.year()) * 100 + i64::from(week.week())
}

fn month(t: &DateTime<Utc>, _: usize) -> i64 {
    year(t, 0) * 100 + i64::from(t.month())
}

fn year(t: &DateTime<Utc>, _: usize) -> i64 {
    i64::from(t.year())
}

/// Applies `policy` to the points `items` of one source, `time` giving each
/// point's time. Returns one decision per item, newest first (equal times keep
/// their input order). See the module documentation for the rules; an empty
/// policy keeps everything with the reason `"no policy"`.
pub fn apply<'a, T>(
    items: &'a [T],
    time: impl Fn(&T) -> DateTime<Utc>,
    policy: &Policy,
) -> Vec<Decision<'a, T>> {
    let mut points: Vec<(DateTime<Utc>, &'a T)> = items.iter().map(|i| (time(i), i)).collect();
    // Stable: equal times stay in input order.
    points.sort_by_key(|p| std::cmp::Reverse(p.0));

    if policy.is_empty() {
        return points
            .into_iter()
            .map(|(_, item)| Decision {
                item,
                keep: true,
                reasons: vec![NO_POLICY],
            })
            .collect();
    }
    let Some(&(newest, _)) = points.first() else {
        return Vec::new();
    };
    // `Some(None)`: the window reaches past the earliest representable time,
    // so every point is within it.
    let cutoff = policy
        .within_window()
        .map(|window| newest.checked_sub_signed(window));

    type Bucket = fn(&DateTime<Utc>, usize) -> i64;
    let rules: [(Option<u32>, Bucket, &'static str, &'static str); 6] = [
        (policy.last, position, "last", "oldest last"),
        (policy.hourly, hour, "hourly", "oldest hourly"),
        (policy.daily, day, "daily", "oldest daily"),
        (policy.weekly, iso_week, "weekly", "oldest weekly"),
        (policy.monthly, month, "monthly", "oldest monthly"),
        (policy.yearly, year, "yearly", "oldest yearly"),
    ];
    let mut counters: Vec<Counter> = rules
        .into_iter()
        .filter_map(|(count, bucket, reason, oldest_reason)| {
            count.filter(|n| *n > 0).map(|left| Counter {
                left,
                bucket,
                previous: None,
                reason,
                oldest_reason,
            })
        })
        .collect();

    let oldest = points.len() - 1;
    points
        .into_iter()
        .enumerate()
        .map(|(nr, (t, item))| {
            let mut reasons = Vec::new();
            for counter in counters.iter_mut().filter(|c| c.left > 0) {
                let bucket = (counter.bucket)(&t, nr);
                let new_bucket = counter.previous != Some(bucket);
                if new_bucket || nr == oldest {
                    reasons.push(if new_bucket {
                        counter.reason
                    } else {
                        counter.oldest_reason
                    });
                    counter.previous = Some(bucket);
                    counter.left -= 1;
                }
            }
            if let Some(cutoff) = cutoff
                && cutoff.is_none_or(|c| t > c)
            {
                reasons.push(WITHIN);
            }
            Decision {
                item,
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    /// The kept times, newest first.
    fn kept(points: &[DateTime<Utc>], policy: &Policy) -> Vec<DateTime<Utc>> {
        apply(points, |t| *t, policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| *d.item)
            .collect()
    }

    /// Kept times with their reasons, newest first.
    fn kept_with_reasons(
        points: &[DateTime<Utc>],
        policy: &Policy,
    ) -> Vec<(DateTime<Utc>, Vec<&'static str>)> {
        apply(points, |t| *t, policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| (*d.item, d.reasons))
            .collect()
    }

    /// Three points a day (08:00, 12:30, 19:45) on 2024-03-01 ..= 2024-03-05,
    /// deliberately out of order.
    fn three_a_day() -> Vec<DateTime<Utc>> {
        let mut points = Vec::new();
        for d in [3, 1, 5, 2, 4] {
            points.push(at(2024, 3, d, 12, 30, 0));
            points.push(at(2024, 3, d, 19, 45, 0));
            points.push(at(2024, 3, d, 8, 0, 0));
        }
        points
    }

    #[test]
    fn decisions_come_back_newest_first_with_every_item() {
        let points = three_a_day();
        let decisions = apply(
            &points,
            |t| *t,
            &Policy {
                daily: Some(1),
                ..Policy::default()
            },
        );
        assert_eq!(decisions.len(), points.len());
        assert!(decisions.windows(2).all(|w| w[0].item >= w[1].item));
        for d in &decisions {
            assert_eq!(d.keep, !d.reasons.is_empty());
        }
    }

    #[test]
    fn empty_input_gives_no_decisions() {
        let none: [DateTime<Utc>; 0] = [];
        assert!(
            apply(
                &none,
                |t| *t,
                &Policy {
                    last: Some(3),
                    ..Policy::default()
                }
            )
            .is_empty()
        );
        assert!(apply(&none, |t| *t, &Policy::default()).is_empty());
    }

    #[test]
    fn empty_policy_keeps_everything_with_reason_no_policy() {
        let points = three_a_day();
        for policy in [
            Policy::default(),
            Policy {
                last: Some(0),
                daily: Some(0),
                within: Some(Duration::zero()),
                ..Policy::default()
            },
        ] {
            assert!(policy.is_empty());
            let decisions = apply(&points, |t| *t, &policy);
            assert_eq!(decisions.len(), 15);
            assert!(
                decisions
                    .iter()
                    .all(|d| d.keep && d.reasons == ["no policy"])
            );
        }
        assert!(
            !Policy {
                hourly: Some(1),
                ..Policy::default()
            }
            .is_empty()
        );
        assert!(
            !Policy {
                within: Some(Duration::seconds(1)),
                ..Policy::default()
            }
            .is_empty()
        );
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let points = three_a_day();
        let policy = Policy {
            last: Some(4),
            ..Policy::default()
        };
        assert_eq!(
            kept(&points, &policy),
            [
                at(2024, 3, 5, 19, 45, 0),
                at(2024, 3, 5, 12, 30, 0),
                at(2024, 3, 5, 8, 0, 0),
                at(2024, 3, 4, 19, 45, 0),
            ]
        );
    }

    #[test]
    fn keep_last_larger_than_history_keeps_everything() {
        let points = three_a_day();
        let decisions = apply(
            &points,
            |t| *t,
            &Policy {
                last: Some(100),
                ..Policy::default()
            },
        );
        assert!(decisions.iter().all(|d| d.keep && d.reasons == ["last"]));
    }

    #[test]
    fn keep_hourly_keeps_newest_of_each_recent_hour_with_points() {
        // 10:05, 10:40, 11:10, 11:50, (no 12:xx), 13:20, 13:21.
        let points = [
            at(2024, 6, 1, 10, 5, 0),
            at(2024, 6, 1, 10, 40, 0),
            at(2024, 6, 1, 11, 10, 0),
            at(2024, 6, 1, 11, 50, 0),
            at(2024, 6, 1, 13, 20, 0),
            at(2024, 6, 1, 13, 21, 0),
        ];
        let policy = Policy {
            hourly: Some(2),
            ..Policy::default()
        };
        // The empty 12:00 hour does not count as one of the two.
        assert_eq!(
            kept(&points, &policy),
            [at(2024, 6, 1, 13, 21, 0), at(2024, 6, 1, 11, 50, 0)]
        );
        let policy = Policy {
            hourly: Some(3),
            ..Policy::default()
        };
        assert_eq!(
            kept(&points, &policy),
            [
                at(2024, 6, 1, 13, 21, 0),
                at(2024, 6, 1, 11, 50, 0),
                at(2024, 6, 1, 10, 40, 0),
            ]
        );
    }

    #[test]
    fn keep_daily_keeps_newest_of_each_of_latest_days() {
        let points = three_a_day();
        let policy = Policy {
            daily: Some(3),
            ..Policy::default()
        };
        assert_eq!(
            kept_with_reasons(&points, &policy),
            [
                (at(2024, 3, 5, 19, 45, 0), vec!["daily"]),
                (at(2024, 3, 4, 19, 45, 0), vec!["daily"]),
                (at(2024, 3, 3, 19, 45, 0), vec!["daily"]),
            ]
        );
    }

    #[test]
    fn days_are_utc_days() {
        // 23:30 and 00:30 UTC are different days whatever the local zone.
        let points = [at(2024, 3, 1, 23, 30, 0), at(2024, 3, 2, 0, 30, 0)];
        let policy = Policy {
            daily: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&points, &policy).len(), 2);
    }

    #[test]
    fn keep_weekly_uses_iso_weeks() {
        // 2020-12-28 (Mon) ..= 2021-01-03 (Sun) is ISO week 2020-W53;
        // 2021-01-04 (Mon) starts 2021-W01. 2020-12-27 (Sun) is 2020-W52.
        let points = [
            at(2020, 12, 27, 9, 0, 0),
            at(2020, 12, 28, 9, 0, 0),
            at(2020, 12, 31, 9, 0, 0),
            at(2021, 1, 3, 9, 0, 0),
            at(2021, 1, 4, 9, 0, 0),
            at(2021, 1, 5, 9, 0, 0),
        ];
        let policy = Policy {
            weekly: Some(2),
            ..Policy::default()
        };
        assert_eq!(
            kept(&points, &policy),
            [at(2021, 1, 5, 9, 0, 0), at(2021, 1, 3, 9, 0, 0)]
        );
    }

    #[test]
    fn keep_monthly_and_yearly() {
        let points = [
            at(2022, 11, 3, 0, 0, 0),
            at(2022, 12, 30, 0, 0, 0),
            at(2023, 1, 2, 0, 0, 0),
            at(2023, 1, 20, 0, 0, 0),
            at(2023, 3, 1, 0, 0, 0),
            at(2023, 3, 31, 23, 59, 59),
        ];
        let monthly = Policy {
            monthly: Some(3),
            ..Policy::default()
        };
        assert_eq!(
            kept(&points, &monthly),
            [
                at(2023, 3, 31, 23, 59, 59),
                at(2023, 1, 20, 0, 0, 0),
                at(2022, 12, 30, 0, 0, 0),
            ]
        );
        let yearly = Policy {
            yearly: Some(1),
            ..Policy::default()
        };
        assert_eq!(kept(&points, &yearly), [at(2023, 3, 31, 23, 59, 59)]);
        let yearly = Policy {
            yearly: Some(2),
            ..Policy::default()
        };
        assert_eq!(
            kept(&points, &yearly),
            [at(2023, 3, 31, 23, 59, 59), at(2022, 12, 30, 0, 0, 0)]
        );
    }

    #[test]
    fn rule_with_counts_left_also_keeps_the_oldest_point() {
        // Two days of points, daily = 5: both days' newest, plus the oldest.
        let points = [
            at(2024, 3, 1, 8, 0, 0),
            at(2024, 3, 1, 12, 0, 0),
            at(2024, 3, 2, 8, 0, 0),
            at(2024, 3, 2, 12, 0, 0),
        ];
        let policy = Policy {
            daily: Some(5),
            ..Policy::default()
        };
        assert_eq!(
            kept_with_reasons(&points, &policy),
            [
                (at(2024, 3, 2, 12, 0, 0), vec!["daily"]),
                (at(2024, 3, 1, 12, 0, 0), vec!["daily"]),
                (at(2024, 3, 1, 8, 0, 0), vec!["oldest daily"]),
            ]
        );
        // With exactly enough days, the counts run out and the oldest goes.
        let policy = Policy {
            daily: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&points, &policy).len(), 2);
    }

    #[test]
    fn within_is_measured_from_the_newest_point_not_now() {
        // A source that stopped backing up in 2001: `within` still keeps its
        // last two days, though they are decades older than the clock.
        let points = [
            at(2001, 5, 1, 12, 0, 0),
            at(2001, 5, 8, 12, 0, 0),
            at(2001, 5, 9, 12, 0, 0),
            at(2001, 5, 10, 11, 0, 0),
            at(2001, 5, 10, 12, 0, 0),
        ];
        let policy = Policy {
            within: Some(Duration::days(2)),
            ..Policy::default()
        };
        assert_eq!(
            kept_with_reasons(&points, &policy),
            [
                (at(2001, 5, 10, 12, 0, 0), vec!["within"]),
                (at(2001, 5, 10, 11, 0, 0), vec!["within"]),
                (at(2001, 5, 9, 12, 0, 0), vec!["within"]),
            ]
        );
        // The boundary is exclusive: exactly newest - 2 days is outside.
        assert!(!kept(&points, &policy).contains(&at(2001, 5, 8, 12, 0, 0)));
        let policy = Policy {
            within: Some(Duration::days(2) + Duration::seconds(1)),
            ..Policy::default()
        };
        assert!(kept(&points, &policy).contains(&at(2001, 5, 8, 12, 0, 0)));
    }

    #[test]
    fn huge_within_keeps_everything() {
        let points = [DateTime::<Utc>::MIN_UTC, at(2024, 1, 1, 0, 0, 0)];
        let policy = Policy {
            within: Some(Duration::MAX),
            ..Policy::default()
        };
        assert_eq!(kept(&points, &policy).len(), 2);
    }

    #[test]
    fn point_kept_by_several_rules_lists_every_reason() {
        let points = three_a_day();
        let policy = Policy {
            last: Some(2),
            hourly: Some(1),
            daily: Some(2),
            weekly: Some(1),
            monthly: Some(1),
            yearly: Some(1),
            within: Some(Duration::hours(1)),
        };
        assert_eq!(
            kept_with_reasons(&points, &policy),
            [
                (
                    at(2024, 3, 5, 19, 45, 0),
                    vec![
                        "last", "hourly", "daily", "weekly", "monthly", "yearly", "within"
                    ]
                ),
                (at(2024, 3, 5, 12, 30, 0), vec!["last"]),
                (at(2024, 3, 4, 19, 45, 0), vec!["daily"]),
            ]
        );
    }

    #[test]
    fn equal_times_keep_input_order() {
        let t = at(2024, 1, 1, 0, 0, 0);
        let items = [(t, 'a'), (t, 'b'), (t - Duration::hours(1), 'c')];
        let decisions = apply(
            &items,
            |i| i.0,
            &Policy {
                last: Some(1),
                ..Policy::default()
            },
        );
        let order: Vec<char> = decisions.iter().map(|d| d.item.1).collect();
        assert_eq!(order, ['a', 'b', 'c']);
        assert!(decisions[0].keep && !decisions[1].keep && !decisions[2].keep);
    }

    /// Continuous protection: a point every 10 seconds for 8 days, thinned to
    /// "everything for an hour, then one per hour for a day, then daily for a
    /// week".
    #[test]
    fn continuous_protection_hour_then_hourly_then_daily() {
        let start = at(2024, 1, 1, 0, 0, 0);
        let points: Vec<DateTime<Utc>> = (0..8 * 8_640)
            .map(|k| start + Duration::seconds(10 * k))
            .collect();
        let newest = at(2024, 1, 8, 23, 59, 50);
        assert_eq!(points.last(), Some(&newest));
        let policy = Policy {
            hourly: Some(24),
            daily: Some(7),
            within: Some(Policy::parse_within("1h").unwrap()),
            ..Policy::default()
        };
        let decisions = apply(&points, |t| *t, &policy);

        // Hand count: 360 points after 22:59:50 on the last day (within);
        // 23 hourly points at HH:59:50 for hours 00..=22 of that day (hour 23's
        // newest is the newest point, already counted); 6 daily points at
        // 23:59:50 on Jan 2 ..= Jan 7 (Jan 8's is the newest point). Jan 1 goes.
        let kept: Vec<&Decision<'_, DateTime<Utc>>> = decisions.iter().filter(|d| d.keep).collect();
        assert_eq!(kept.len(), 360 + 23 + 6);

        let last_day = newest.date_naive();
        for d in &decisions {
            let t = *d.item;
            let end_of_hour = t.minute() == 59 && t.second() == 50;
            let expected: &[&str] = if t == newest {
                &["hourly", "daily", "within"]
            } else if t > newest - Duration::hours(1) {
                &["within"]
            } else if t.date_naive() == last_day && end_of_hour {
                &["hourly"]
            } else if t.day() >= 2 && t.hour() == 23 && end_of_hour {
                &["daily"]
            } else {
                &[]
            };
            assert_eq!(d.reasons, expected, "point {t}");
        }
    }

    #[test]
    fn parse_within_accepts_good_durations() {
        let ok = |s: &str| Policy::parse_within(s).unwrap();
        assert_eq!(ok("30min"), Duration::minutes(30));
        assert_eq!(ok("36h"), Duration::hours(36));
        assert_eq!(ok("7d"), Duration::days(7));
        assert_eq!(ok("2w"), Duration::days(14));
        assert_eq!(ok("30mo"), Duration::days(30 * 31));
        assert_eq!(ok("1y2mo3d"), Duration::days(366 + 62 + 3));
        assert_eq!(ok("3d1y"), Duration::days(366 + 3));
        assert_eq!(
            ok("1d12h30min15s"),
            Duration::seconds(86_400 + 12 * 3_600 + 1_800 + 15)
        );
        assert_eq!(ok(" 7d "), Duration::days(7));
        assert_eq!(ok("0d1h"), Duration::hours(1));
    }

    #[test]
    fn parse_within_rejects_bad_durations_naming_the_text() {
        for (input, fragment) in [
            ("", "empty"),
            ("   ", "empty"),
            ("7", "needs a unit"),
            ("7x", "\"x\""),
            ("7 d", "needs a unit"),
            ("d", "expected a number at \"d\""),
            ("-1d", "expected a number at \"-1d\""),
            ("1.5d", "needs a unit"),
            ("7D", "\"D\""),
            ("1d2d", "\"d\" appears twice"),
            ("0d", "longer than zero"),
            ("0h0min", "longer than zero"),
            ("99999999999999999999y", "too long"),
            ("999999999999999y", "too long"),
            ("7d!", "expected a number at \"!\""),
            (
                "10m",
                "10m is ambiguous: write 10mo for months or 10min for minutes",
            ),
            ("1y6m", "6m is ambiguous"),
        ] {
            let err = Policy::parse_within(input).unwrap_err();
            assert!(
                err.contains(&format!("{input:?}")),
                "{input:?}: error does not name the input: {err}"
            );
            assert!(err.contains(fragment), "{input:?}: {err}");
        }
    }

    fn times() -> impl Strategy<Value = Vec<i64>> {
        prop_oneof![
            // Dense: several points per hour over a few days.
            proptest::collection::vec(0i64..4 * 86_400, 0..40),
            // Sparse: weeks, months and years.
            proptest::collection::vec(0i64..3 * 366 * 86_400, 0..40),
        ]
    }

    fn policies() -> impl Strategy<Value = Policy> {
        let count = || proptest::option::of(0u32..6);
        (
            count(),
            count(),
            count(),
            count(),
            count(),
            count(),
            proptest::option::of(0i64..10 * 86_400),
        )
            .prop_map(
                |(last, hourly, daily, weekly, monthly, yearly, within)| Policy {
                    last,
                    hourly,
                    daily,
                    weekly,
                    monthly,
                    yearly,
                    within: within.map(Duration::seconds),
                },
            )
    }

    fn time_of(seconds: &i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    proptest! {
        #[test]
        fn keep_last_alone_keeps_min_of_n_and_len(times in times(), n in 1u32..50) {
            let decisions = apply(&times, time_of, &Policy { last: Some(n), ..Policy::default() });
            let kept = decisions.iter().filter(|d| d.keep).count();
            prop_assert_eq!(kept, (n as usize).min(times.len()));
        }

        #[test]
        fn policy_invariants_hold(times in times(), policy in policies()) {
            let decisions = apply(&times, time_of, &policy);
            prop_assert_eq!(decisions.len(), times.len());
            prop_assert!(decisions.windows(2).all(|w| time_of(w[0].item) >= time_of(w[1].item)));

            // Kept exactly when there is a reason.
            for d in &decisions {
                prop_assert_eq!(d.keep, !d.reasons.is_empty());
            }

            // The newest point is always kept when any rule is on.
            if let Some(first) = decisions.first() {
                prop_assert!(first.keep);
                if policy.is_empty() {
                    prop_assert_eq!(&first.reasons, &["no policy"]);
                }
            }

            // Applying the policy to what it kept keeps all of it.
            let kept: Vec<i64> = decisions.iter().filter(|d| d.keep).map(|d| *d.item).collect();
            let again = apply(&kept, time_of, &policy);
            prop_assert_eq!(again.len(), kept.len());
            prop_assert!(again.iter().all(|d| d.keep));
        }
    }
}
