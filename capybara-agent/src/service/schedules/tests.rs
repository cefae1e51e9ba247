use super::*;

#[test]
fn commands_split_like_a_shell_without_expanding() {
    let w = |s: &str| split_command("command", s).unwrap();
    assert_eq!(
        w("backup create --keep 7"),
        ["backup", "create", "--keep", "7"]
    );
    assert_eq!(
        w(r#"user add "a b" 'c "d"' e\ f"#),
        ["user", "add", "a b", r#"c "d""#, "e f"]
    );
    assert_eq!(w(r#"x "a\"b\\c" ''"#), ["x", r#"a"b\c"#, ""]);
    // Nothing is expanded: there is no shell.
    assert_eq!(
        w("x $HOME * `id` ; y"),
        ["x", "$HOME", "*", "`id`", ";", "y"]
    );
    for bad in ["x 'a", "x \"a", "x \\", "", "   "] {
        let e = split_command("command", bad).unwrap_err();
        assert!(e.to_string().starts_with("command: "), "{bad:?}: {e}");
    }
    let long = "x".repeat(MAX_COMMAND_BYTES + 1);
    assert!(split_command("command", &long).is_err());
}

#[test]
fn ids_and_missed_rules_parse_naming_their_field() {
    assert_eq!(parse_id("id", "3"), Ok(3));
    for bad in ["0", "-1", "x", "1.5"] {
        assert!(
            parse_id("id", bad)
                .unwrap_err()
                .to_string()
                .starts_with("id: ")
        );
    }
    assert_eq!(Missed::parse("missed", ""), Ok(Missed::Run));
    assert_eq!(Missed::parse("missed", "skip"), Ok(Missed::Skip));
    assert!(
        Missed::parse("missed", "later")
            .unwrap_err()
            .to_string()
            .starts_with("missed: ")
    );
}

#[test]
fn output_is_bounded_at_a_character_boundary() {
    let (o, d) = bound_output("é".repeat(MAX_OUTPUT_BYTES));
    assert!(o.len() <= MAX_OUTPUT_BYTES && o.len() > MAX_OUTPUT_BYTES - 2);
    assert_eq!(o.len() as u64 + d, 2 * MAX_OUTPUT_BYTES as u64);
    assert_eq!(bound_output("short".into()), ("short".into(), 0));
}

#[test]
fn the_latest_due_time_stands_for_every_one_passed() {
    let s = CronSchedule::parse("0 * * * *", "UTC").unwrap();
    let h = 3600;
    let t0 = 1_796_000_400 - 1_796_000_400 % h; // on an hour
    // Nothing due yet.
    assert_eq!(latest_due(&s, t0, t0 + h - 1), None);
    // Five hours passed: one due time, the latest.
    assert_eq!(latest_due(&s, t0, t0 + 5 * h + 10), Some(t0 + 5 * h));
    assert_eq!(latest_due(&s, t0, t0 + h), Some(t0 + h));
}
