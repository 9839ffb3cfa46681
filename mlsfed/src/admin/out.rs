//! How admin commands print: one JSON object per line (`--json`), or for
//! people a table, a record as `key: value` lines, or a sentence.

use serde_json::Value;

pub(crate) struct Out {
    pub json: bool,
}

impl Out {
    /// Rows (JSON objects), as JSON lines or as a table of `columns`
    /// (key, header).
    pub fn table(&self, rows: &[Value], columns: &[(&str, &str)]) {
        if self.json {
            for r in rows {
                println!("{r}");
            }
            return;
        }
        print!("{}", render_table(rows, columns));
    }

    /// One record: a JSON line, or `key  value` lines in the fields' order
    /// followed by `notes`.
    pub fn record(&self, fields: &Fields, notes: &[&str]) {
        if self.json {
            println!("{}", fields.to_value());
            return;
        }
        let width = fields.0.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &fields.0 {
            println!("{k:width$}  {}", cell(v));
        }
        for n in notes {
            println!("note: {n}");
        }
    }

    /// The outcome of an action: a JSON line, or `human`.
    pub fn done(&self, row: &Value, human: &str) {
        if self.json {
            println!("{row}");
        } else {
            println!("{human}");
        }
    }
}

/// A record's fields in the order people read them (a JSON object has
/// none).
pub(crate) struct Fields(pub Vec<(&'static str, Value)>);

impl Fields {
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect())
    }
}

fn render_table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    if rows.is_empty() {
        return "(none)\n".to_owned();
    }
    let cells: Vec<Vec<String>> =
        rows.iter().map(|r| columns.iter().map(|(k, _)| cell(r.get(*k).unwrap_or(&Value::Null))).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, h))| cells.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(h.len()))
        .collect();
    let line = |fields: Vec<&str>| {
        let mut s = String::new();
        for (i, f) in fields.iter().enumerate() {
            if i + 1 == fields.len() {
                s.push_str(f);
            } else {
                s.push_str(&format!("{f:w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(columns.iter().map(|(_, h)| *h).collect());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A value as a table cell: `-` for none, `yes`/`no`, `k=v` pairs.
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_show_absent_values() {
        let rows = vec![
            serde_json::json!({"peer": "b.example", "depth": 3, "paused": true}),
            serde_json::json!({"peer": "c.example.org", "depth": null, "paused": false}),
        ];
        let t = render_table(&rows, &[("peer", "PEER"), ("depth", "DEPTH"), ("paused", "PAUSED")]);
        assert_eq!(t, "PEER           DEPTH  PAUSED\nb.example      3      yes\nc.example.org  -      no\n", "{t}");
        assert_eq!(render_table(&[], &[("a", "A")]), "(none)\n");
        assert_eq!(cell(&serde_json::json!({"a.example": 2, "b.example": 1})), "a.example=2 b.example=1");
    }
}
