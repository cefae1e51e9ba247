//! IP intelligence on the in-memory dataplane: the switch, sources, refused lists, the reload
//! rule, swaps, restarts.

use std::{sync::Arc, time::Duration};

use super::*;
use crate::service::{
    Service, ServiceConfig,
    domain::Actor,
    testing::{MemoryPlane, open_service},
};

struct Fixture {
    dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    svc: Service,
}

fn open(dir: tempfile::TempDir, plane: Arc<MemoryPlane>) -> Fixture {
    let svc = open_service(
        &dir.path().join("store"),
        plane.clone(),
        ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "vpn.example:51820"),
    );
    Fixture { dir, plane, svc }
}

fn fixture() -> Fixture {
    open(
        tempfile::tempdir().unwrap(),
        Arc::new(MemoryPlane::default()),
    )
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

impl Fixture {
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn kernel(&self, list: &str) -> Option<Vec<String>> {
        self.plane
            .list_cidrs_for_tests(list)
            .map(|l| l.iter().map(ToString::to_string).collect())
    }

    fn actions(&self) -> Vec<String> {
        let mut a: Vec<String> = self
            .svc
            .core
            .audit_records(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        a.reverse();
        a
    }

    fn block(&self, c: Category, source: Source) -> Result<IntelStatus, ServiceError> {
        self.svc.intel.set_source(
            &root(),
            c,
            SourceChange::On {
                source: Some(source),
                refresh: None,
                allow_private: false,
            },
        )
    }
}

impl MemoryPlane {
    fn list_cidrs_for_tests(&self, name: &str) -> Option<Vec<Cidr>> {
        use crate::service::ports::Plane as _;
        self.list_cidrs(Direction::Source, &ListName::parse(name).unwrap())
    }
}

#[test]
fn the_switch_decides_what_the_kernel_holds_and_the_store_keeps_the_list() {
    let f = fixture();
    assert!(!f.svc.intel.enabled());
    let tor = f.write("tor.txt", "# exits\n1.2.3.4\n5.6.7.0/24\n");
    let s = f.block(Category::Tor, Source::File(tor.clone())).unwrap();
    // Disabled: loaded and stored, not enforced.
    assert_eq!(f.kernel("tor"), None);
    let l = &s.lists[0];
    assert_eq!(
        (l.name.as_str(), l.on, l.enforced, l.entries),
        ("tor", true, false, 2)
    );
    assert_eq!(l.source_kind, "file");

    f.svc.intel.set_enabled(&root(), true).unwrap();
    assert!(f.svc.intel.enabled());
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.4/32", "5.6.7.0/24"]);
    f.svc.intel.set_enabled(&root(), false).unwrap();
    assert_eq!(
        f.kernel("tor").unwrap(),
        Vec::<String>::new(),
        "emptied, id kept"
    );
    f.svc.intel.set_enabled(&root(), true).unwrap();
    assert_eq!(
        f.kernel("tor").unwrap().len(),
        2,
        "from the store, no reload"
    );

    // Off keeps the source and the list.
    let s = f
        .svc
        .intel
        .set_source(&root(), Category::Tor, SourceChange::Off)
        .unwrap();
    assert_eq!(f.kernel("tor").unwrap().len(), 0);
    assert_eq!((s.lists[0].on, s.lists[0].entries), (false, 2));
    assert_eq!(
        f.actions(),
        [
            "ip-intel.block-tor",
            "ip-intel.enable",
            "ip-intel.disable",
            "ip-intel.enable",
            "ip-intel.unblock-tor"
        ]
    );
}

#[test]
fn turning_a_category_on_without_a_source_succeeds_with_an_empty_list() {
    let f = fixture();
    f.svc.intel.set_enabled(&root(), true).unwrap();
    let s = f
        .svc
        .intel
        .set_source(
            &root(),
            Category::Vpn,
            SourceChange::On {
                source: None,
                refresh: None,
                allow_private: false,
            },
        )
        .unwrap();
    let vpn = s.lists.iter().find(|l| l.name == "vpn").unwrap();
    assert!(vpn.on && vpn.enforced && vpn.source_kind.is_empty() && vpn.entries == 0);
    let e = f.svc.intel.refresh(&root(), Category::Vpn).unwrap_err();
    assert!(
        matches!(
            &e,
            ServiceError::SourceUnavailable {
                field: "category",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_bad_list_is_refused_whole_naming_its_line_and_the_old_one_stays() {
    let f = fixture();
    f.svc.intel.set_enabled(&root(), true).unwrap();
    let good = f.write("tor.txt", "1.2.3.4\n");
    f.block(Category::Tor, Source::File(good.clone())).unwrap();
    let before = f.actions().len();

    // A new source that does not parse: refused, nothing changed.
    let bad = f.write("bad.txt", "1.1.1.1\n# fine\n1.2.3.999\n");
    let e = f.block(Category::Tor, Source::File(bad)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "file: line 3: \"1.2.3.999\": expected ADDRESS/LEN, e.g. 10.0.0.0/8 or 2001:db8::/32"
    );
    assert!(matches!(e, ServiceError::Invalid(_)));
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.4/32"]);
    assert_eq!(
        f.svc.intel.settings().tor.source,
        Some(Source::File(good.clone()))
    );
    assert_eq!(f.actions().len(), before);

    // The configured file goes bad: the reload fails, the old list stays, the error is shown.
    std::fs::write(&good, "1.2.3.4\nnonsense\n").unwrap();
    let e = f
        .svc
        .intel
        .refresh(&Actor::Agent, Category::Tor)
        .unwrap_err();
    assert!(
        e.to_string().starts_with("file: line 2: \"nonsense\""),
        "{e}"
    );
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.4/32"]);
    let s = f.svc.intel.status().unwrap();
    assert!(s.lists[0].last_error.contains("line 2"), "{:?}", s.lists[0]);
    assert_eq!(f.svc.intel.refresh_failures(), 1);
    assert_eq!(f.svc.intel.failing().len(), 1);

    // Fixed: the next reload swaps and clears the error.
    std::fs::write(&good, "1.2.3.4\n9.9.9.9\n").unwrap();
    f.svc.intel.refresh(&Actor::Agent, Category::Tor).unwrap();
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.4/32", "9.9.9.9/32"]);
    assert!(f.svc.intel.status().unwrap().lists[0].last_error.is_empty());
    assert_eq!(f.actions().last().unwrap(), "ip-intel.refresh");

    // Bad input: names the field, changes nothing.
    for (change, field) in [
        (
            SourceChange::On {
                source: Some(Source::File("relative.txt".into())),
                refresh: None,
                allow_private: false,
            },
            "file: ",
        ),
        (
            SourceChange::On {
                source: Some(Source::Url("ftp://x/".into())),
                refresh: None,
                allow_private: false,
            },
            "url: ",
        ),
        (
            SourceChange::On {
                source: None,
                refresh: Some(Duration::from_secs(5)),
                allow_private: false,
            },
            "refresh: ",
        ),
        (
            SourceChange::On {
                source: Some(Source::File(f.dir.path().join("missing"))),
                refresh: None,
                allow_private: false,
            },
            "file: cannot read",
        ),
    ] {
        let e = f
            .svc
            .intel
            .set_source(&root(), Category::Tor, change)
            .unwrap_err();
        assert!(e.to_string().starts_with(field), "{e}");
    }
    assert_eq!(f.kernel("tor").unwrap().len(), 2);
}

#[test]
fn an_unchanged_reload_writes_only_its_time_and_a_changed_file_is_due() {
    let f = fixture();
    f.svc.intel.set_enabled(&root(), true).unwrap();
    let p = f.write("vpn.txt", "10.0.0.0/8\n");
    f.block(Category::Vpn, Source::File(p.clone())).unwrap();
    let n = f.actions().len();
    f.svc.intel.refresh(&Actor::Agent, Category::Vpn).unwrap();
    assert_eq!(f.actions().len(), n, "no audit record for an equal list");

    // Not due right after a load; due once the file changes (size, mtime or inode).
    let now = Instant::now();
    assert!(f.svc.intel.due(now).is_empty());
    let tmp = f.write("vpn.new", "10.0.0.0/8\n11.0.0.0/8\n");
    std::fs::rename(&tmp, &p).unwrap();
    assert_eq!(f.svc.intel.due(Instant::now()), [Category::Vpn]);
    f.svc.intel.refresh(&Actor::Agent, Category::Vpn).unwrap();
    assert!(f.svc.intel.due(Instant::now()).is_empty());
    assert_eq!(f.kernel("vpn").unwrap().len(), 2);
    // Due again once its interval (jittered) has passed.
    assert_eq!(
        f.svc.intel.due(Instant::now() + DEFAULT_REFRESH * 2),
        [Category::Vpn]
    );
    // Disabled: nothing is due.
    f.svc.intel.set_enabled(&root(), false).unwrap();
    assert!(
        f.svc
            .intel
            .due(Instant::now() + DEFAULT_REFRESH * 2)
            .is_empty()
    );
}

#[test]
fn jitter_stays_within_its_bounds() {
    let d = Duration::from_secs(3600);
    let (mut lo, mut hi) = (d, d);
    for _ in 0..2000 {
        let j = jittered(d);
        lo = lo.min(j);
        hi = hi.max(j);
    }
    assert!(lo >= Duration::from_secs(3240) && hi <= Duration::from_secs(3960));
    assert!(
        lo < Duration::from_secs(3400) && hi > Duration::from_secs(3800),
        "{lo:?} {hi:?}"
    );
}

#[test]
fn allow_punches_holes_and_settings_survive_a_restart() {
    let f = fixture();
    f.svc.intel.set_enabled(&root(), true).unwrap();
    let p = f.write("tor.txt", "1.2.3.0/24\n");
    f.block(Category::Tor, Source::File(p)).unwrap();
    let s = f
        .svc
        .intel
        .allow(&root(), &["1.2.3.4".parse().unwrap()], false)
        .unwrap();
    let allow = s.lists.iter().find(|l| l.name == "allow").unwrap();
    assert_eq!(allow.entries, 1);
    assert_eq!(f.kernel("allow").unwrap(), ["1.2.3.4/32"]);
    assert!(matches!(
        f.svc.intel.allow(&root(), &[], false),
        Err(ServiceError::Invalid(ValidationError::Missing {
            field: "cidrs"
        }))
    ));

    // A restart on the same store: the settings are back and the kernel list is left as is.
    let Fixture { dir, plane, svc } = f;
    drop(svc);
    let f = open(dir, plane);
    assert!(f.svc.intel.enabled());
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.0/24"]);

    // A kernel that lost the list (pins removed) gets it back from the store at open.
    let Fixture { dir, svc, .. } = f;
    drop(svc);
    let f = open(dir, Arc::new(MemoryPlane::default()));
    assert_eq!(f.kernel("tor").unwrap(), ["1.2.3.0/24"]);
}
