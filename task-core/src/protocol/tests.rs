use super::*;
use proptest::prelude::*;
use serde_json::json;

fn celery_headers() -> Map<String, Value> {
    // As captured from celery 5.7.0's `send_task('tasks.add', (2, 2), {'z': 1}, countdown=10,
    // expires=60, time_limit=30, soft_time_limit=20)`.
    json!({"lang":"py","task":"tasks.add","id":"83c2a1f0-0000-4000-8000-000000000001","shadow":null,
        "eta":"2026-11-27T11:05:23.479318+00:00","expires":"2026-11-27T11:06:13.479318+00:00",
        "group":null,"group_index":null,"retries":0,"timelimit":[30,20],
        "root_id":"83c2a1f0-0000-4000-8000-000000000001","parent_id":null,"argsrepr":"(2, 2)",
        "kwargsrepr":"{'z': 1}","origin":"gen14723@vm","ignore_result":null,
        "replaced_task_nesting":0,"stamped_headers":null,"stamps":{}})
    .as_object()
    .cloned()
    .unwrap()
}

fn raw(headers: Map<String, Value>, content_type: &str, body: Vec<u8>) -> RawMessage {
    RawMessage {
        headers,
        properties: Properties {
            content_type: Some(content_type.into()),
            ..Default::default()
        },
        body,
    }
}

#[test]
fn decodes_a_message_from_python_celery() {
    let body = br#"[[2, 2], {"z": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    let m = TaskMessage::decode(&raw(celery_headers(), "application/json", body.to_vec())).unwrap();
    assert_eq!(m.headers.task, "tasks.add");
    assert_eq!(m.args, vec![json!(2), json!(2)]);
    assert_eq!(m.kwargs.get("z"), Some(&json!(1)));
    assert_eq!(m.headers.time_limit, Some(30.0));
    assert_eq!(m.headers.soft_time_limit, Some(20.0));
    assert_eq!(
        format_datetime(m.headers.eta.unwrap()),
        "2026-11-27T11:05:23.479318+00:00"
    );
    assert!(!m.headers.ignore_result);
    assert_eq!(m.headers.extra.get("stamps"), Some(&json!({})));
}

#[test]
fn accepts_float_time_limits_naive_eta_and_other_integer_widths() {
    let mut h = celery_headers();
    h.insert("timelimit".into(), json!([1.5, null]));
    h.insert("eta".into(), json!("2026-11-27T11:05:23.5"));
    h.insert("retries".into(), json!(3.0));
    let m = TaskMessage::decode(&raw(h, "application/json", b"[[], {}, null]".to_vec())).unwrap();
    assert_eq!(m.headers.time_limit, Some(1.5));
    assert_eq!(m.headers.soft_time_limit, None);
    assert_eq!(m.headers.retries, 3);
    assert_eq!(
        format_datetime(m.headers.eta.unwrap()),
        "2026-11-27T11:05:23.500000+00:00"
    );
}

#[test]
fn resolves_kombu_type_wrappers() {
    let body = json!([[{"__type__": "datetime", "__value__": "2026-01-01T00:00:00"},
        {"__type__": "bytes", "__value__": "hi"}], {"d": {"__type__": "decimal", "__value__": "1.50"}}, {}]);
    let m = TaskMessage::decode(&raw(
        celery_headers(),
        "application/json",
        serde_json::to_vec(&body).unwrap(),
    ))
    .unwrap();
    assert_eq!(m.args[0], json!("2026-01-01T00:00:00"));
    let b: Bytes = serde_json::from_value(m.args[1].clone()).unwrap();
    assert_eq!(b.0, b"hi");
    assert_eq!(m.kwargs["d"], json!("1.50"));
}

#[test]
fn kombu_uuids_decode_into_uuid_arguments() {
    // What kombu 5.7's `dumps(uuid.UUID(...))` writes, and what older versions wrote.
    let body = json!([[{"__type__": "uuid", "__value__": {"hex": "72424c8301cb429aa579eecd0171c1bd"}}],
        {"old": {"__type__": "uuid", "__value__": "72424c83-01cb-429a-a579-eecd0171c1bd"}}, {}]);
    let m = TaskMessage::decode(&raw(
        celery_headers(),
        "application/json",
        serde_json::to_vec(&body).unwrap(),
    ))
    .unwrap();
    let id: uuid::Uuid = serde_json::from_value(m.args[0].clone()).unwrap();
    assert_eq!(id.to_string(), "72424c83-01cb-429a-a579-eecd0171c1bd");
    assert_eq!(
        m.kwargs["old"],
        json!("72424c83-01cb-429a-a579-eecd0171c1bd")
    );
}

#[test]
fn msgpack_round_trip_keeps_bytes_as_bin() {
    let mut m = TaskMessage::new("diag.echo", "id-1");
    m.content_type = ContentType::Msgpack;
    m.args = vec![
        serde_json::to_value(Bytes(vec![0, 159, 146, 150])).unwrap(),
        json!(u64::MAX),
    ];
    m.kwargs
        .insert("k".into(), json!({"nested": [1.5, null, true]}));
    let raw = m.encode().unwrap();
    assert_eq!(
        raw.properties.content_type.as_deref(),
        Some("application/x-msgpack")
    );
    // The bytes travel as msgpack bin (0xc4), not as a map.
    assert!(raw.body.windows(2).any(|w| w == [0xc4, 4]));
    let back = TaskMessage::decode(&raw).unwrap();
    assert_eq!(back.args, m.args);
    assert_eq!(back.kwargs, m.kwargs);
}

#[test]
fn protocol_v1_messages_are_accepted() {
    let body = json!({"task": "diag.add", "id": "v1-id", "args": [1, 2], "kwargs": {}, "retries": 1,
        "eta": null, "expires": null, "taskset": "g1"});
    let m = TaskMessage::decode(&raw(
        Map::new(),
        "application/json",
        serde_json::to_vec(&body).unwrap(),
    ))
    .unwrap();
    assert_eq!(m.headers.task, "diag.add");
    assert_eq!(m.headers.retries, 1);
    assert_eq!(m.headers.group.as_deref(), Some("g1"));
    assert_eq!(m.args, vec![json!(1), json!(2)]);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let cases: Vec<(RawMessage, &str)> = vec![
        (
            raw(
                celery_headers(),
                "application/json",
                b"\xff\xfe garbage".to_vec(),
            ),
            "malformed JSON",
        ),
        (
            raw(
                celery_headers(),
                "application/x-python-serialize",
                b"x".to_vec(),
            ),
            "unsupported content type",
        ),
        (
            raw(celery_headers(), "application/json", b"{\"a\": 1}".to_vec()),
            "not a Celery task body",
        ),
        (
            raw(
                celery_headers(),
                "application/json",
                b"[1, {}, {}]".to_vec(),
            ),
            "args must be a list",
        ),
        (
            raw(Map::new(), "application/json", b"[[], {}, {}]".to_vec()),
            "missing header `task`",
        ),
        (
            raw(celery_headers(), "application/x-msgpack", vec![0x93, 0x90]),
            "malformed msgpack",
        ),
    ];
    for (message, expected) in cases {
        let err = TaskMessage::decode(&message).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{err:?} should mention {expected:?}"
        );
    }
}

#[test]
fn encoded_headers_carry_everything_celery_writes() {
    let mut m = TaskMessage::new("diag.add", "abc");
    m.headers.time_limit = Some(10.0);
    let raw = m.encode().unwrap();
    for key in [
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
    ] {
        assert!(raw.headers.contains_key(key), "missing {key}");
    }
    assert_eq!(raw.headers["timelimit"], json!([10.0, null]));
    assert_eq!(raw.properties.delivery_mode, Some(2));
    assert_eq!(raw.properties.correlation_id.as_deref(), Some("abc"));
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn decoder_never_panics_on_arbitrary_bodies(body in prop::collection::vec(any::<u8>(), 0..256),
                                                msgpack in any::<bool>()) {
        let ct = if msgpack { "application/x-msgpack" } else { "application/json" };
        let _ = TaskMessage::decode(&raw(celery_headers(), ct, body));
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_headers(headers in prop::collection::btree_map(
            prop_oneof![Just("task".to_string()), Just("id".to_string()), Just("eta".to_string()),
                        Just("timelimit".to_string()), Just("retries".to_string()), "[a-z_]{1,8}"],
            arb_json(), 0..8)) {
        let headers: Map<String, Value> = headers.into_iter().collect();
        let _ = TaskMessage::decode(&raw(headers, "application/json", b"[[], {}, {}]".to_vec()));
    }

    #[test]
    fn encode_then_decode_is_identity(args in prop::collection::vec(arb_json(), 0..4),
                                      kwargs in prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..4),
                                      msgpack in any::<bool>(), retries in 0u32..1000) {
        let mut m = TaskMessage::new("t.x", "some-id");
        m.content_type = if msgpack { ContentType::Msgpack } else { ContentType::Json };
        m.args = args;
        m.kwargs = kwargs.into_iter().collect();
        m.headers.retries = retries;
        let back = TaskMessage::decode(&m.encode().unwrap()).unwrap();
        prop_assert_eq!(back.args, m.args);
        prop_assert_eq!(back.kwargs, m.kwargs);
        prop_assert_eq!(back.headers.retries, retries);
    }
}

#[test]
fn naive_times_are_read_in_the_configured_timezone() {
    use chrono::TimeZone;
    let mut headers = celery_headers();
    headers.insert("eta".into(), json!("2026-07-01T12:00:00"));
    headers.insert("expires".into(), json!("2026-07-01T13:00:00+00:00"));
    let m = raw(headers, "application/json", b"[[], {}, {}]".to_vec());
    let utc = TaskMessage::decode(&m).unwrap();
    assert_eq!(
        utc.headers.eta,
        Some(chrono::Utc.with_ymd_and_hms(2026, 7, 1, 12, 0, 0).unwrap())
    );
    let moscow = TaskMessage::decode_in(&m, chrono_tz::Europe::Moscow).unwrap();
    assert_eq!(
        moscow.headers.eta,
        Some(chrono::Utc.with_ymd_and_hms(2026, 7, 1, 9, 0, 0).unwrap()),
        "12:00 in Moscow (UTC+3) is 09:00 UTC"
    );
    // An aware time keeps its own offset.
    assert_eq!(moscow.headers.expires, utc.headers.expires);
    // Summer time: 12:00 in Berlin in July is 10:00 UTC; the hour that does not exist when the
    // clocks go forward is read with the winter offset.
    let berlin = |s: &str| crate::protocol::parse_datetime_in(s, chrono_tz::Europe::Berlin);
    assert_eq!(
        berlin("2026-07-01T12:00:00"),
        Some(chrono::Utc.with_ymd_and_hms(2026, 7, 1, 10, 0, 0).unwrap())
    );
    assert_eq!(
        berlin("2026-03-29T02:30:00"),
        Some(chrono::Utc.with_ymd_and_hms(2026, 3, 29, 1, 30, 0).unwrap())
    );
}
