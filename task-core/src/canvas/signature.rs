//! A signature: one task call (name, arguments, options) as a JSON dict, in the shape of Python's
//! `celery.canvas.Signature` (`{task, args, kwargs, options, subtask_type, immutable}`), and the
//! constructors of the composite kinds (`chain`, `group`, `chord`) whose wire form is the same dict
//! with `subtask_type` set and the members in `kwargs`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// One task call, or a composite (`subtask_type` = `chain`, `group` or `chord`).
///
/// ```
/// use task_core::canvas::{Signature, chain};
/// let first = Signature::new("diag.add").args([2.into(), 3.into()]);
/// let then = Signature::new("py.mul").args([10.into()]).queue("py");
/// let workflow = chain([first, then]);
/// assert_eq!(workflow.subtask_type.as_deref(), Some("chain"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Registered task name (`celery.chain`, `celery.group`, `celery.chord` for composites).
    pub task: String,
    /// Positional arguments; a parent's result is put in front unless `immutable`.
    #[serde(default, deserialize_with = "null_default")]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default, deserialize_with = "null_default")]
    pub kwargs: Map<String, Value>,
    /// `apply_async` options: `task_id`, `queue`, `link`, `link_error`, `group_id`, ...
    #[serde(default, deserialize_with = "null_default")]
    pub options: Map<String, Value>,
    /// `null` for a plain task; `chain`, `group`, `chord`, ... for composites.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// Set by Python's `.si()`: the parent's result is not passed in.
    #[serde(default, deserialize_with = "null_default")]
    pub immutable: bool,
    /// Keys Celery versions add (`chord_size`), kept so a signature goes on unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Signature {
    /// A call of `task` with no arguments.
    pub fn new(task: impl Into<String>) -> Self {
        Signature {
            task: task.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            options: Map::new(),
            subtask_type: None,
            immutable: false,
            extra: Map::new(),
        }
    }

    /// Reads a signature dict as found in a message's `embed` or an option.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        serde_json::from_value(value.clone()).map_err(|e| format!("not a signature: {e}"))
    }

    /// The dict Python's `Signature.__json__` gives.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Sets the positional arguments.
    pub fn args(mut self, args: impl IntoIterator<Item = Value>) -> Self {
        self.args = args.into_iter().collect();
        self
    }

    /// Sets one keyword argument.
    pub fn kwarg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(key.into(), value.into());
        self
    }

    /// Makes the signature immutable (Python's `.si()`): no parent result is prepended.
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Sets an `apply_async` option (Python's `.set(key=value)`).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// The queue the task is sent to.
    pub fn queue(self, queue: impl Into<String>) -> Self {
        self.set("queue", queue.into())
    }

    /// A fixed task id.
    pub fn with_id(self, id: impl Into<String>) -> Self {
        self.set("task_id", id.into())
    }

    /// Runs `callback` with this task's result when it succeeds (Python's `.link()`).
    pub fn link(mut self, callback: Signature) -> Self {
        push_option(&mut self.options, "link", callback.to_value());
        self
    }

    /// Runs `errback` with this task's id when it fails (Python's `.link_error()`).
    pub fn link_error(mut self, errback: Signature) -> Self {
        push_option(&mut self.options, "link_error", errback.to_value());
        self
    }

    /// The task id, if frozen.
    pub fn id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }

    /// Assigns a task id unless one is set (Python's `freeze`) and returns it.
    pub fn freeze(&mut self) -> String {
        if let Some(id) = self.id() {
            return id.to_owned();
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.options.insert("task_id".into(), id.clone().into());
        id
    }

    /// Members of a `chain` or `group` (`kwargs.tasks`).
    pub(crate) fn members(&self) -> Result<Vec<Signature>, String> {
        match self.kwargs.get("tasks") {
            Some(Value::Array(tasks)) => tasks.iter().map(Signature::from_value).collect(),
            Some(Value::Object(_)) => {
                // A group dict in place of the list (a chord header built from a group).
                let inner = Signature::from_value(&self.kwargs["tasks"])?;
                inner.members()
            }
            other => Err(format!(
                "{} has no task list (kwargs.tasks is {other:?})",
                self.task
            )),
        }
    }
}

fn push_option(options: &mut Map<String, Value>, key: &str, value: Value) {
    match options.get_mut(key) {
        Some(Value::Array(list)) => list.push(value),
        Some(single @ Value::Object(_)) => {
            let first = single.take();
            *single = Value::Array(vec![first, value]);
        }
        _ => {
            options.insert(key.into(), Value::Array(vec![value]));
        }
    }
}

/// `chain(a, b, c)`: `b` gets `a`'s result, `c` gets `b`'s.
pub fn chain(tasks: impl IntoIterator<Item = Signature>) -> Signature {
    composite("celery.chain", "chain", tasks)
}

/// `group([a, b])`: run in parallel; members carry the group id and their index.
pub fn group(tasks: impl IntoIterator<Item = Signature>) -> Signature {
    composite("celery.group", "group", tasks)
}

/// `chord([a, b], body)`: `body` gets the list of the header's results, once all have finished.
pub fn chord(header: impl IntoIterator<Item = Signature>, body: Signature) -> Signature {
    let mut kwargs = Map::new();
    kwargs.insert("kwargs".into(), Value::Object(Map::new()));
    kwargs.insert(
        "header".into(),
        Value::Array(header.into_iter().map(|s| s.to_value()).collect()),
    );
    kwargs.insert("body".into(), body.to_value());
    Signature {
        kwargs,
        subtask_type: Some("chord".into()),
        ..Signature::new("celery.chord")
    }
}

fn composite(name: &str, kind: &str, tasks: impl IntoIterator<Item = Signature>) -> Signature {
    let mut kwargs = Map::new();
    kwargs.insert(
        "tasks".into(),
        Value::Array(tasks.into_iter().map(|s| s.to_value()).collect()),
    );
    Signature {
        kwargs,
        subtask_type: Some(kind.into()),
        ..Signature::new(name)
    }
}

/// A list option that Celery allows as one item or a list (`link`, `link_error`, `callbacks`).
pub(crate) fn signatures_in(value: Option<&Value>) -> Vec<Result<Signature, String>> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().map(Signature::from_value).collect(),
        Some(one) => vec![Signature::from_value(one)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_wire_form_is_pythons() {
        // `json.dumps(chain(signature('diag.add', (1, 2)), signature('py.mul', (3,))))` in
        // celery 5.7.0.
        let python = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [
            {"task": "diag.add", "args": [1, 2], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false},
            {"task": "py.mul", "args": [3], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}]},
            "options": {}, "subtask_type": "chain", "immutable": false});
        let ours = chain([
            Signature::new("diag.add").args([json!(1), json!(2)]),
            Signature::new("py.mul").args([json!(3)]),
        ]);
        assert_eq!(ours.to_value(), python);
        assert_eq!(Signature::from_value(&python).unwrap(), ours);

        let linked = Signature::new("diag.add")
            .link(Signature::new("py.mul"))
            .link_error(Signature::new("py.err"));
        assert_eq!(linked.options["link"][0]["task"], "py.mul");
        assert_eq!(linked.options["link_error"][0]["task"], "py.err");

        let c = chord([Signature::new("a")], Signature::new("b"));
        assert_eq!(c.kwargs["header"][0]["task"], "a");
        assert_eq!(c.kwargs["body"]["task"], "b");
        assert_eq!(c.kwargs["kwargs"], json!({}));
    }

    #[test]
    fn nulls_and_unknown_keys_are_accepted() {
        let s = Signature::from_value(&json!({"task": "t", "args": null, "kwargs": null,
            "options": null, "subtask_type": null, "immutable": null, "chord_size": 3}))
        .unwrap();
        assert!(s.args.is_empty() && !s.immutable);
        assert_eq!(s.to_value()["chord_size"], 3);
    }
}
