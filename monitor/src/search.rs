//! The task search syntax of Flower's `search` parameter, plus negation: whitespace-separated
//! terms, all of which must match.
//!
//! - `name:billing.*` `state:FAILURE` `worker:celery@a` `uuid:1f2e` `args:42` `kwargs:amount`
//!   `result:ok` — qualifiers; `*` is a wildcard in `name`, `worker` and `state`, the others match
//!   substrings.
//! - a bare word matches a substring of the id, name, args, kwargs or result (Flower needs three
//!   characters; so do we, shorter words are ignored).
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
    /// Appends ` AND <condition>` to a query over `tasks`.
    pub fn push_sql(&self, q: &mut QueryBuilder<Postgres>) {
        q.push(if self.negated { " AND NOT " } else { " AND " });
        let contains = format!("%{}%", like_escape(&self.value));
        let column = |q: &mut QueryBuilder<Postgres>, col: &str, value: String, op: &str| {
            q.push(format!("COALESCE({col}, '') {op} "))
                .push_bind(value);
        };
        match self.field {
            Some(Field::Name) => column(q, "name", pattern(&self.value), "LIKE"),
            Some(Field::Worker) => column(q, "worker", pattern(&self.value), "LIKE"),
            Some(Field::State) => column(q, "state", pattern(&self.value), "ILIKE"),
            Some(Field::Uuid) => column(q, "uuid", contains, "ILIKE"),
            Some(Field::Args) => column(q, "args", contains, "ILIKE"),
            Some(Field::Kwargs) => column(q, "kwargs", contains, "ILIKE"),
            Some(Field::Result) => column(q, "result", contains, "ILIKE"),
            None => {
                q.push("(");
                for (i, col) in ["uuid", "name", "args", "kwargs", "result"]
                    .iter()
                    .enumerate()
                {
                    if i > 0 {
                        q.push(" OR ");
                    }
                    column(q, col, contains.clone(), "ILIKE");
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
        for t in parse("name:diag.* -state:FAILURE 100%").unwrap() {
            t.push_sql(&mut q);
        }
        assert_eq!(
            q.sql().as_str(),
            "SELECT 1 FROM tasks WHERE true AND COALESCE(name, '') LIKE $1 AND NOT \
             COALESCE(state, '') ILIKE $2 AND (COALESCE(uuid, '') ILIKE $3 OR COALESCE(name, '') \
             ILIKE $4 OR COALESCE(args, '') ILIKE $5 OR COALESCE(kwargs, '') ILIKE $6 OR \
             COALESCE(result, '') ILIKE $7)"
        );
    }
}
