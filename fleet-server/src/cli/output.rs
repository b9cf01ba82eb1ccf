//! What the operator commands print: aligned tables for people, JSON for
//! machines, and readable values (UTC times, `-` for nothing).

use serde_json::Value;

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Appends a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, ending with a newline.
    pub fn render(&self) -> String {
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            out.push_str(&render_row(row, &widths));
            out.push('\n');
        }
        out
    }
}

fn render_row(cells: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if index > 0 {
            line.push_str("  ");
        }
        line.push_str(cell);
        let pad = width.saturating_sub(cell.chars().count());
        line.extend(std::iter::repeat_n(' ', pad));
    }
    line.trim_end().to_owned()
}

/// Pretty JSON.
pub fn json(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A value for a table cell: strings as they are, `-` for null, lists joined.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) if text.is_empty() => "-".into(),
        Value::String(text) => text.clone(),
        Value::Bool(flag) => if *flag { "yes" } else { "no" }.into(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A Unix-milliseconds value as UTC, `-` for null.
pub fn time_ms(value: &Value) -> String {
    value
        .as_i64()
        .map_or_else(|| "-".into(), |ms| utc(ms.div_euclid(1_000)))
}

/// A Unix-seconds value as UTC, `-` for null.
pub fn time_s(value: &Value) -> String {
    value.as_i64().map_or_else(|| "-".into(), utc)
}

/// `YYYY-MM-DD hh:mm:ssZ` of Unix seconds (proleptic Gregorian calendar).
pub fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// The calendar date `days` after 1970-01-01: counted in 400-year eras of
/// 146,097 days, each year starting on March 1 so leap days come last.
fn civil_date(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["ID", "STATUS"]);
        table.row(vec!["wc-1".into(), "active".into()]);
        table.row(vec!["wc-12345".into(), "revoked".into()]);
        assert_eq!(table.render(), "ID        STATUS\nwc-1      active\nwc-12345  revoked\n");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(utc(-1), "1969-12-31 23:59:59Z");
        assert_eq!(time_ms(&json!(1_000)), "1970-01-01 00:00:01Z");
        assert_eq!(time_ms(&Value::Null), "-");
    }

    #[test]
    fn cells_are_readable() {
        assert_eq!(text(&json!(["a", "b"])), "a,b");
        assert_eq!(text(&json!([])), "-");
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!(3)), "3");
    }
}
