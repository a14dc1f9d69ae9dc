//! The task search syntax of Flower's `search` parameter, plus negation: whitespace-separated
//! terms, all of which must match.
//!
//! - `name:billing.*` `state:FAILURE` `worker:celery@a` `uuid:1f2e` `args:42` `kwargs:amount`
//!   `result:ok` — qualifiers; `name`, `worker` and `state` match exactly, or with `*` as a
//!   wildcard (`state` in any case); the others match substrings.
//! - a bare word matches a substring of the id, name, args, kwargs, result or exception (Flower
//!   needs three characters; so do we, shorter words are ignored).
//! - `-term` negates any of these, e.g. `-state:SUCCESS`.
//! - `"quoted words"` keep their spaces.

use sqlx::{Postgres, QueryBuilder};

/// One search term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The column (or `None` for "any text column").
    pub field: Option<Field>,
    /// The value as written.
    pub value: String,
    /// Whether the term must not match.
    pub negated: bool,
}

/// A searchable column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Task name (pattern).
    Name,
    /// State (pattern, case-insensitive).
    State,
    /// Worker node name (pattern).
    Worker,
    /// Task id (substring).
    Uuid,
    /// Args repr (substring).
    Args,
    /// Kwargs repr (substring).
    Kwargs,
    /// Result repr (substring).
    Result,
}

/// Parses a search string; unknown qualifiers are an error naming them.
pub fn parse(text: &str) -> Result<Vec<Term>, String> {
    let mut terms = Vec::new();
    for word in split(text) {
        let (negated, word) = match word.strip_prefix('-') {
            Some(rest) if !rest.is_empty() => (true, rest.to_owned()),
            _ => (false, word),
        };
        let (field, value) = match word.split_once(':') {
            Some((q, v)) => {
                let field = match q.to_ascii_lowercase().as_str() {
                    "name" => Field::Name,
                    "state" => Field::State,
                    "worker" => Field::Worker,
                    "uuid" | "id" => Field::Uuid,
                    "args" => Field::Args,
                    "kwargs" => Field::Kwargs,
                    "result" => Field::Result,
                    other => {
                        return Err(format!(
                            "unknown qualifier `{other}:` (use name, state, worker, uuid, args, kwargs or result)"
                        ));
                    }
                };
                (Some(field), v.trim_matches('"').to_owned())
            }
            None => (None, word),
        };
        if value.is_empty() || (field.is_none() && value.chars().count() < 3) {
            continue;
        }
        terms.push(Term {
            field,
            value,
            negated,
        });
    }
    Ok(terms)
}

fn split(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
        .into_iter()
        .map(|w| {
            if w.starts_with('"') && w.ends_with('"') && w.len() >= 2 {
                w[1..w.len() - 1].to_owned()
            } else {
                w
            }
        })
        .collect()
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn pattern(s: &str) -> String {
    like_escape(s).replace('*', "%")
}

impl Term {
    /// Appends ` AND <condition>` to a query over `tasks`. A term that can use an index does:
    /// `name:x` and `worker:x` without `*` are equalities, with a trailing `*` prefix matches,
    /// `state:x` is an equality on the upper-cased state. Negated terms treat a missing value as
    /// the empty string, so `-name:x` keeps tasks whose name is unknown.
    pub fn push_sql(&self, q: &mut QueryBuilder<Postgres>) {
        let negated = self.negated;
        let column = |q: &mut QueryBuilder<Postgres>, col: &str, value: String, op: &str| {
            if negated {
                q.push(format!("COALESCE({col}, '') {op} "));
            } else {
                q.push(format!("{col} {op} "));
            }
            q.push_bind(value);
        };
        let exact_or_pattern = |q: &mut QueryBuilder<Postgres>, col: &str, value: &str| {
            if value.contains('*') {
                column(q, col, pattern(value), "LIKE");
            } else {
                column(q, col, value.to_owned(), "=");
            }
        };
        q.push(if negated { " AND NOT " } else { " AND " });
        let contains = format!("%{}%", like_escape(&self.value));
        match self.field {
            Some(Field::Name) => exact_or_pattern(q, "name", &self.value),
            Some(Field::Worker) => exact_or_pattern(q, "worker", &self.value),
            Some(Field::State) => exact_or_pattern(q, "state", &self.value.to_uppercase()),
            Some(Field::Uuid) => column(q, "uuid", contains, "ILIKE"),
            Some(Field::Args) => column(q, "args", contains, "ILIKE"),
            Some(Field::Kwargs) => column(q, "kwargs", contains, "ILIKE"),
            Some(Field::Result) => column(q, "result", contains, "ILIKE"),
            None => {
                q.push("(");
                for (i, col) in ["uuid", "name", "args", "kwargs", "result", "exception"]
                    .iter()
                    .enumerate()
                {
                    if i > 0 {
                        q.push(" OR ");
                    }
                    q.push(format!("COALESCE({col}, '') ILIKE "));
                    q.push_bind(contains.clone());
                }
                q.push(")");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifiers_words_negation_and_quotes() {
        let terms = parse(r#"name:billing.* -state:SUCCESS "two words" ab args:42"#).unwrap();
        assert_eq!(terms.len(), 4, "{terms:?}");
        assert_eq!(terms[0].field, Some(Field::Name));
        assert!(terms[1].negated && terms[1].value == "SUCCESS");
        assert_eq!(terms[2].value, "two words");
        assert_eq!(terms[3].field, Some(Field::Args));
        assert!(parse("colour:red").unwrap_err().contains("colour"));
    }

    #[test]
    fn terms_become_bound_conditions() {
        let mut q = QueryBuilder::<Postgres>::new("SELECT 1 FROM tasks WHERE true");
        for t in parse("name:diag.* -state:failure worker:w1@h 100%").unwrap() {
            t.push_sql(&mut q);
        }
        assert_eq!(
            q.sql().as_str(),
            "SELECT 1 FROM tasks WHERE true AND name LIKE $1 AND NOT COALESCE(state, '') = $2 \
             AND worker = $3 AND (COALESCE(uuid, '') ILIKE $4 OR COALESCE(name, '') ILIKE $5 OR \
             COALESCE(args, '') ILIKE $6 OR COALESCE(kwargs, '') ILIKE $7 OR \
             COALESCE(result, '') ILIKE $8 OR COALESCE(exception, '') ILIKE $9)"
        );
    }
}
