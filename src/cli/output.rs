//! How client commands print: aligned tables and `key: value` lists for people, the API's JSON
//! as it was sent for scripts.

use std::time::{Duration, UNIX_EPOCH};

/// Hex digits of a commit id shown in tables.
pub const SHORT_ID_LEN: usize = 12;
/// Characters of a commit message shown in tables.
const MESSAGE_WIDTH_MAX: usize = 60;

/// A table with a header row; columns are padded to their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let padding = widths[column].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.push_str(&" ".repeat(padding + 2));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Prints `key: value` lines with the values aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, value) in fields {
        println!("{:<width$}  {value}", format!("{key}:"), width = width + 1);
    }
}

/// Prints an API answer as the API sent it, after checking it is JSON; an empty answer (204)
/// prints nothing.
pub fn print_json(text: &str) -> anyhow::Result<()> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(());
    }
    let _: serde_json::Value = super::client::decode(text)?;
    println!("{text}");
    Ok(())
}

/// A Unix timestamp as RFC 3339 UTC, to the second.
pub fn time(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}

pub fn short_id(id: &str) -> String {
    id.chars().take(SHORT_ID_LEN).collect()
}

/// The first line of a commit message, cut to fit a table.
pub fn message_summary(message: &str) -> String {
    let first_line = message.lines().next().unwrap_or("");
    if first_line.chars().count() > MESSAGE_WIDTH_MAX {
        let cut: String = first_line.chars().take(MESSAGE_WIDTH_MAX - 3).collect();
        format!("{cut}...")
    } else {
        first_line.to_string()
    }
}

pub fn or_dash(value: Option<&str>) -> String {
    value.map(str::to_string).unwrap_or_else(|| "-".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["NAME", "SIZE", "NOTE"]);
        table.row(vec!["vm-1".into(), "10 GiB".into(), "".into()]);
        table.row(vec!["database".into(), "1 TiB".into(), "x".into()]);
        assert_eq!(
            table.render(),
            "NAME      SIZE    NOTE\nvm-1      10 GiB\ndatabase  1 TiB   x\n"
        );
    }

    #[test]
    fn times_and_ids() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(short_id("0123456789abcdef0123456789abcdef"), "0123456789ab");
        assert_eq!(message_summary("first\nsecond"), "first");
        assert_eq!(
            message_summary(&"m".repeat(100)).chars().count(),
            MESSAGE_WIDTH_MAX
        );
    }
}
