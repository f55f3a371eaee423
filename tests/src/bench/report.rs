//! The benchmark's outputs: a table on stdout, `report.json`, `report.md`
//! and one SVG plot per metric (each mode against N). Every judgement (targets,
//! generator check, run-to-run spread) is computed from the report's figures
//! alone, so republishing from report.json redoes it.

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;

use super::{GeneratorCheck, MAX_ERROR_RATE, Placement, Report, Row, Stat, label, topology::Family};

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

/// The results as Markdown tables (also printed on stdout): IPv4, then
/// IPv6 if measured.
pub fn table(r: &Report) -> String {
    let has = |family| r.rows.iter().any(|x| x.family == family);
    let mut t = String::new();
    if has(Family::Ipv4) || !has(Family::Ipv6) {
        t = rows_table(r.rows.iter().filter(|x| x.family == Family::Ipv4));
    }
    if has(Family::Ipv6) {
        t.push_str(
            "\nIPv6, on an IPv6-only cluster (the same pods, nodes and Services with IPv6 addresses alone; \
             iptables mode writes ip6tables rules).\n\n",
        );
        t.push_str(&rows_table(r.rows.iter().filter(|x| x.family == Family::Ipv6)));
    }
    t
}

fn rows_table<'a>(rows: impl Iterator<Item = &'a Row>) -> String {
    let mut t = String::from(
        "| mode | backends | Services | conn/s (median, min–max) | × direct | conn errors % | RR p50 µs | RR p99 µs | cold program ms | one change ms (median, min–max) | agent RSS MiB | agent peak MiB | BPF maps MiB | iptables rules | agent CPU ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        writeln!(
            t,
            "| {} | {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            row.mode,
            row.placement.as_str(),
            row.services,
            row.conn_rate.median,
            row.conn_rate.min,
            row.conn_rate.max,
            fmt(row.conn_ratio, 3),
            fmt(row.conn_error_rate().map(|e| e * 100.0), 2),
            row.rr_p50_us.median,
            row.rr_p99_us.median,
            fmt(row.cold_ms, 0),
            row.change_ms.as_ref().map_or("–".into(), |s| format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)),
            fmt(row.agent_rss_mib, 1),
            fmt(row.agent_peak_mib, 1),
            fmt(row.bpf_maps_mib, 1),
            row.iptables_rules.map_or("–".into(), |n| n.to_string()),
            fmt(row.agent_cpu_ms, 0),
        )
        .expect("writing to a String cannot fail");
    }
    t
}

/// A metric plotted per mode against the number of Services (log scale).
struct Plot {
    file: &'static str,
    title: &'static str,
    y: &'static str,
    log_y: bool,
    value: fn(&Row) -> Option<f64>,
}

const PLOTS: [Plot; 8] = [
    Plot {
        file: "conn_rate.svg",
        title: "Connection setup rate",
        y: "connections/s",
        log_y: false,
        value: |r| Some(r.conn_rate.median),
    },
    Plot {
        file: "conn_ratio.svg",
        title: "Connection setup rate relative to direct",
        y: "× direct",
        log_y: false,
        value: |r| if r.mode == "direct" { Some(1.0) } else { r.conn_ratio },
    },
    Plot {
        file: "rr_p50.svg",
        title: "Request latency p50 (established connection)",
        y: "µs",
        log_y: false,
        value: |r| Some(r.rr_p50_us.median),
    },
    Plot {
        file: "rr_p99.svg",
        title: "Request latency p99 (established connection)",
        y: "µs",
        log_y: false,
        value: |r| Some(r.rr_p99_us.median),
    },
    Plot {
        file: "cold_program.svg",
        title: "Programming all Services from a cold start",
        y: "ms",
        log_y: true,
        value: |r| r.cold_ms,
    },
    Plot {
        file: "one_change.svg",
        title: "One changed EndpointSlice until traffic follows",
        y: "ms",
        log_y: true,
        value: |r| r.change_ms.as_ref().map(|s| s.median),
    },
    Plot { file: "agent_rss.svg", title: "Agent resident memory", y: "MiB", log_y: false, value: |r| r.agent_rss_mib },
    Plot {
        file: "agent_peak.svg",
        title: "Agent peak resident memory (VmHWM)",
        y: "MiB",
        log_y: false,
        value: |r| r.agent_peak_mib,
    },
];

fn color(mode: &str) -> RGBColor {
    match mode {
        "ebpf" => RGBColor(0x1f, 0x77, 0xb4),
        "ebpf-socket" => RGBColor(0x94, 0x67, 0xbd),
        "ebpf-tc" => RGBColor(0x17, 0xbe, 0xcf),
        "iptables" => RGBColor(0xd6, 0x27, 0x28),
        _ => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

/// A plotted line: a mode with its backends placed one way.
struct Series {
    mode: &'static str,
    placement: Placement,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn label(&self) -> String {
        match self.placement {
            Placement::SameNode => self.mode.to_string(),
            other => format!("{} ({})", self.mode, other.as_str()),
        }
    }

    /// The mode's color; backends on another node get it paler.
    fn color(&self) -> RGBColor {
        let c = color(self.mode);
        match self.placement {
            Placement::SameNode => c,
            Placement::OtherNode => RGBColor(c.0 / 2 + 128, c.1 / 2 + 128, c.2 / 2 + 128),
            Placement::Outside => RGBColor(c.0 / 2, c.1 / 2, c.2 / 2),
        }
    }
}

fn plot(report: &Report, p: &Plot, out: &Path) -> anyhow::Result<()> {
    let modes = ["direct", "ebpf-socket", "ebpf", "ebpf-tc", "iptables"];
    let series: Vec<Series> = [Placement::SameNode, Placement::OtherNode, Placement::Outside]
        .into_iter()
        .flat_map(|placement| modes.map(|mode| (mode, placement)))
        .map(|(mode, placement)| {
            let points = report
                .rows
                .iter()
                .filter(|r| r.mode == mode && r.placement == placement && r.family == Family::Ipv4)
                .filter_map(|r| Some(((r.services as f64).max(1.0), (p.value)(r)?)))
                .filter(|(_, y)| y.is_finite() && (!p.log_y || *y > 0.0))
                .collect();
            Series { mode, placement, points }
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo > hi {
        return Ok(());
    }
    let max_n = report.rows.iter().map(|r| r.services).max().unwrap_or(1) as f64 * 2.0;
    let path = out.join(p.file);
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = (p.title, ("sans-serif", 20));
    let mut builder = ChartBuilder::on(&root);
    builder.caption(caption.0, caption.1).margin(12).x_label_area_size(40).y_label_area_size(70);
    let x = (0.5f64..max_n).log_scale();
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc("Services installed").y_desc(p.y).draw()?;
            for s in &series {
                let c = s.color();
                chart
                    .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))?
                    .label(s.label())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart.draw_series(s.points.iter().map(|pt| Circle::new(*pt, 4, c.filled())))?;
            }
            chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        }};
    }
    if p.log_y {
        draw!(builder.build_cartesian_2d(x, (lo / 2.0..hi * 2.0).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d(x, 0f64..hi * 1.15)?);
    }
    root.present()?;
    Ok(())
}

/// Writes report.json, report.md and the plots into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(report)?)?;
    for p in &PLOTS {
        plot(report, p, out)?;
    }
    std::fs::write(out.join("report.md"), markdown(report, ""))?;
    Ok(())
}

/// The report as Markdown; plots are linked relative to `plot_dir`.
pub fn markdown(r: &Report, plot_dir: &str) -> String {
    let mut md = String::new();
    writeln!(
        md,
        "Machine: {}  \nCommand: `{}`  \niptables mode backend: {}  \nEach figure is the median of {} run(s) of {:.1} s ({} concurrent connections for the connection-rate load); spread is min–max.\n",
        r.machine, r.command, r.iptables_backend, r.repetitions, r.duration_s, r.threads
    ).expect("writing to a String cannot fail");
    md.push_str(&table(r));
    writeln!(md, "\n{}\n", spread(r)).expect("writing to a String cannot fail");
    md.push_str(&packet_table(r));
    md.push_str(&program_table(r));
    md.push_str(&dns_table(r));
    writeln!(md, "Generator check: {}\n", r.generator.as_ref().map_or("not run.".into(), generator_verdict))
        .expect("writing to a String cannot fail");
    if !r.problems.is_empty() {
        md.push_str("Problems in this run (each leaves its figure out or marks it):\n\n");
        for p in &r.problems {
            writeln!(md, "- {p}").expect("writing to a String cannot fail");
        }
        md.push('\n');
    }
    md.push_str(&targets(r));
    for p in &PLOTS {
        writeln!(md, "![{}]({plot_dir}{})\n", p.title, p.file).expect("writing to a String cannot fail");
    }
    md
}

/// The DNS add-on against the reference server, if measured.
pub fn dns_table(r: &Report) -> String {
    if r.dns.is_empty() {
        return String::new();
    }
    let mut t = String::from(
        "DNS: dnsperf (4 clients, up to 200 queries in flight, on one CPU) against kpr's DNS add-on and dnsmasq \
         (the same names in a hosts file, the same upstream, a 10,000-entry cache) on the other CPU; cluster \
         names asked in random order over every Service, forwarded names from 1,000 both have cached.\n\n\
         | Services | names | kpr queries/s | dnsmasq queries/s | × dnsmasq | kpr p99 | dnsmasq p99 | lost (kpr / dnsmasq) |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let find = |n: usize, server: &str, names: &str| {
        r.dns.iter().find(|d| d.services == n && d.server == server && d.names == names)
    };
    let mut ns: Vec<usize> = r.dns.iter().map(|d| d.services).collect();
    ns.dedup();
    for n in ns {
        for names in ["cluster", "forwarded"] {
            let (Some(k), Some(d)) = (find(n, "kpr", names), find(n, "dnsmasq", names)) else { continue };
            writeln!(
                t,
                "| {n} | {names} | {:.0} | {:.0} | {:.2} | {:.2} ms | {:.2} ms | {} / {} |",
                k.qps.median,
                d.qps.median,
                k.qps.median / d.qps.median,
                k.p99_ms.median,
                d.p99_ms.median,
                k.lost,
                d.lost
            )
            .expect("writing to a String cannot fail");
        }
    }
    for c in &r.dns_changes {
        writeln!(
            t,
            "\nA Service created with {} Services installed was answered after {:.0} ms.",
            c.services, c.answered_ms
        )
        .expect("writing to a String cannot fail");
    }
    t.push('\n');
    t
}

/// What a run of the per-packet programs costs, by the kind of packet
/// (rows) and the number of Services (columns), if measured.
pub fn program_table(r: &Report) -> String {
    let costs = &r.program_costs;
    if costs.is_empty() {
        return String::new();
    }
    let mut ns: Vec<usize> = costs.iter().map(|c| c.services).collect();
    ns.dedup();
    let mut t = format!(
        "Cost of one run of the per-packet path's programs, by the kind of packet (the kernel running each \
         on one frame {} times over, BPF_PROG_TEST_RUN, with the agent's maps and N Services: a floor \
         to compare builds by when run back to back, with the caches warm, the test harness's own share in every figure and \
         the rewrite's checksum updates left out, as the measured Service's backend is its own VIP so that \
         the frame stays the same; in traffic a run costs two to three times this), ns a run (median of the \
         batches):\n\n| packet | program |",
        costs[0].runs
    );
    for n in &ns {
        write!(t, " {n} Services |").expect("writing to a String cannot fail");
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---:|".repeat(ns.len()));
    t.push('\n');
    // Every N measures the same kinds, in the same order.
    for (packet, program) in costs.iter().filter(|c| c.services == ns[0]).map(|c| (&c.packet, &c.program)) {
        write!(t, "| {packet} | `{program}` |").expect("writing to a String cannot fail");
        for n in &ns {
            let c = costs.iter().find(|c| c.services == *n && &c.packet == packet && &c.program == program);
            write!(t, " {} |", fmt(c.map(|c| c.ns_per_run.median), 0)).expect("writing to a String cannot fail");
        }
        t.push('\n');
    }
    t.push('\n');
    t
}

/// The packet-rate test's figures, if it ran.
pub fn packet_table(r: &Report) -> String {
    if r.packet_rates.is_empty() {
        return String::new();
    }
    let mut t = String::from(
        "Packet rate from outside through a node port to a backend on another node (60-byte UDP frames, \
         64 flows, handed to the node's wire as live XDP frames by a generator on one CPU, as a NIC's DMA \
         would, paced above what any mode forwards; the node's receive path on the other CPU; what the \
         node forwards is counted on its wire). Packets per CPU is the forwarded rate over the receiving \
         CPU's busy share.\n\n\
         | mode | forwarded pps (median, min–max) | offered pps | receiving CPU busy | pps per CPU | × iptables (per CPU) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let iptables = r.packet_rates.iter().find(|p| p.mode == "iptables").map(|p| p.pps_per_cpu.median);
    for p in &r.packet_rates {
        writeln!(
            t,
            "| {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0}% | {:.0} | {} |",
            super::packets::mode_name(&p.mode),
            p.forwarded_pps.median,
            p.forwarded_pps.min,
            p.forwarded_pps.max,
            p.offered_pps.median,
            p.receive_cpu_busy.median * 100.0,
            p.pps_per_cpu.median,
            fmt(iptables.map(|i| p.pps_per_cpu.median / i), 2),
        )
        .expect("writing to a String cannot fail");
    }
    t.push('\n');
    t
}

/// `rows`' figures grouped by where their backends ran ("backends on the
/// same node: 1: …, 1000: …; backends on the other node: …"), each row
/// shown by `show` after its N; rows `show` has nothing for are left out.
fn by_placement(rows: &[&Row], show: impl Fn(&Row) -> Option<String>) -> String {
    let groups: Vec<String> = [Placement::SameNode, Placement::OtherNode]
        .into_iter()
        .filter_map(|placement| {
            let at: Vec<String> = rows
                .iter()
                .filter(|x| x.placement == placement)
                .filter_map(|x| Some(format!("{}: {}", x.services, show(x)?)))
                .collect();
            (!at.is_empty()).then(|| format!("backends on the {}: {}", placement.as_str(), at.join(", ")))
        })
        .collect();
    groups.join("; ")
}

/// The socket-level rows' ratios from runs taken in turn with the direct
/// line (see `Row::socket_in_turn`), judged against `target` by their
/// medians; none where no row has them.
fn in_turn(rows: &[&Row], target: f64) -> Option<String> {
    let measured: Vec<&Stat> = rows.iter().filter_map(|x| x.socket_in_turn.as_ref()).collect();
    if measured.is_empty() {
        return None;
    }
    let ratios = by_placement(rows, |x| {
        let s = x.socket_in_turn.as_ref()?;
        Some(format!("{} [{}-{}]", fmt(Some(s.median), 3), fmt(Some(s.min), 3), fmt(Some(s.max), 3)))
    });
    let all = measured.iter().all(|s| s.median >= target);
    Some(format!(
        "  - the same in pairs of runs taken in turn with the direct line while the agent runs, the hooks' cost alone \
         (median [lowest-highest] of the pairs' ratios): {ratios}: {}\n",
        if all { "met" } else { "not met" }
    ))
}

/// The targets the project set itself, and whether this run met them.
pub fn targets(r: &Report) -> String {
    let row = |mode: &str, n: usize| {
        r.rows.iter().find(|x| {
            x.mode == mode && x.services == n && x.placement == Placement::SameNode && x.family == Family::Ipv4
        })
    };
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let mut out = String::from("Targets (reported whether met or not):\n\n");
    let targets = [
        ("ebpf", "per-packet", Family::Ipv4, 0.95),
        ("ebpf-socket", "socket-level", Family::Ipv4, 0.98),
        ("ebpf", "per-packet (IPv6)", Family::Ipv6, 0.95),
        ("ebpf-socket", "socket-level (IPv6)", Family::Ipv6, 0.98),
    ];
    for (mode, name, family, target) in targets {
        let rows: Vec<&Row> =
            r.rows.iter().filter(|x| x.mode == mode && x.family == family && !x.placement.outside()).collect();
        if rows.is_empty() {
            continue;
        }
        let ratios = by_placement(&rows, |x| Some(fmt(x.conn_ratio, 3)));
        let all = rows.iter().all(|x| x.conn_ratio.is_some_and(|v| v >= target));
        writeln!(out, "- eBPF {name} connection rate ≥ {target} × direct at every N ({ratios}): {}", verdict(all))
            .expect("writing to a String cannot fail");
        if let Some(line) = in_turn(&rows, target) {
            out.push_str(&line);
        }
    }
    for (family, over) in [(Family::Ipv4, ""), (Family::Ipv6, " (IPv6)")] {
        let outside: Vec<&Row> =
            r.rows.iter().filter(|x| x.mode == "ebpf" && x.placement.outside() && x.family == family).collect();
        if outside.is_empty() {
            continue;
        }
        let at: Vec<String> = outside.iter().map(|x| format!("{}: {}", x.services, fmt(x.conn_ratio, 3))).collect();
        let all = outside.iter().all(|x| x.conn_ratio.is_some_and(|v| v >= 0.9));
        writeln!(
            out,
            "- eBPF connection rate from outside through a node port{over} ≥ 0.9 × direct to the pods ({}): {}",
            at.join(", "),
            verdict(all)
        )
        .expect("writing to a String cannot fail");
        // Not a target: how much of the gap is the path's extra hop, which
        // traffic routed by the node with no proxy pays too.
        let routed: Vec<String> = outside
            .iter()
            .filter_map(|x| {
                let by_node = r.rows.iter().find(|d| {
                    d.mode == super::ROUTED && d.services == x.services && d.family == family && d.placement.outside()
                })?;
                let hop = by_node.conn_ratio?;
                Some(format!(
                    "{}: {} × direct via node, which is {} × direct",
                    x.services,
                    fmt(Some(x.conn_rate.median / by_node.conn_rate.median), 3),
                    fmt(Some(hop), 3)
                ))
            })
            .collect();
        if !routed.is_empty() {
            writeln!(
                out,
                "  - the same from outside{over} against the pods dialled through the node port's node, routed there \
                 with no proxy (the node port path's extra hop, without the proxy): {}",
                routed.join(", ")
            )
            .expect("writing to a String cannot fail");
        }
    }
    let pps = |mode: &str| r.packet_rates.iter().find(|p| p.mode == mode).map(|p| p.pps_per_cpu.median);
    if let (Some(xdp), Some(ip)) = (pps("ebpf"), pps("iptables")) {
        writeln!(
            out,
            "- XDP packet rate from outside ≥ 3 × iptables mode's, per CPU ({xdp:.0} vs {ip:.0} packets/s, {:.2}×): {}",
            xdp / ip,
            verdict(xdp >= 3.0 * ip)
        )
        .expect("writing to a String cannot fail");
    }
    for n in [10_000, 50_000] {
        if let (Some(ip), Some(eb)) = (row("iptables", n), row("ebpf", n)) {
            let below = ip.conn_rate.max < eb.conn_rate.min;
            writeln!(
                out,
                "- iptables visibly below eBPF at {n} Services ({:.0} vs {:.0} conn/s): {}",
                ip.conn_rate.median,
                eb.conn_rate.median,
                verdict(below)
            )
            .expect("writing to a String cannot fail");
        }
    }
    if let Some(eb) = row("ebpf", 50_000) {
        let change = eb.change_ms.as_ref().map(|s| s.median);
        let ip_change = row("iptables", 50_000).and_then(|x| x.change_ms.as_ref().map(|s| s.median));
        writeln!(
            out,
            "- one change at 50,000 Services under 5 ms in eBPF ({} ms; iptables {} ms): {}",
            fmt(change, 1),
            fmt(ip_change, 0),
            verdict(change.is_some_and(|c| c < 5.0))
        )
        .expect("writing to a String cannot fail");
        writeln!(
            out,
            "- cold programming of 50,000 Services under 2 s in eBPF ({} ms): {}",
            fmt(eb.cold_ms, 0),
            verdict(eb.cold_ms.is_some_and(|c| c < 2000.0))
        )
        .expect("writing to a String cannot fail");
        writeln!(
            out,
            "- agent peak memory ≤ 64 MiB at 50,000 Services / 150,000 endpoints in eBPF mode (peak {} MiB with {} \
             endpoints; {} MiB resident once programmed): {}",
            fmt(eb.agent_peak_mib, 1),
            eb.endpoints,
            fmt(eb.agent_rss_mib, 1),
            verdict(eb.agent_peak_mib.is_some_and(|m| m <= 64.0))
        )
        .expect("writing to a String cannot fail");
    } else {
        out.push_str(
            "- one change under 5 ms, cold programming under 2 s, and agent peak memory ≤ 64 MiB at 50,000 \
             Services / 150,000 endpoints in eBPF mode: not measured (no 50,000-Service eBPF figures in this run)\n",
        );
    }
    let worst = r.rows.iter().max_by(|a, b| a.conn_error_worst.total_cmp(&b.conn_error_worst));
    writeln!(
        out,
        "- connection errors ≤ {:.0}% of attempts in every connection-rate run (worst {}): {}",
        MAX_ERROR_RATE * 100.0,
        match worst {
            Some(w) if w.conn_error_worst > 0.0 => {
                format!("{:.2}%, {}", w.conn_error_worst * 100.0, label(w))
            }
            Some(_) => "0%: no attempt failed".into(),
            None => "–".into(),
        },
        verdict(worst.is_some_and(|w| w.conn_error_worst <= MAX_ERROR_RATE) && r.problems.is_empty())
    )
    .expect("writing to a String cannot fail");
    out.push('\n');
    out
}

/// (max − min) / median of a repeated figure; None without a usable median.
fn relative_spread(s: &Stat) -> Option<f64> {
    let v = (s.max - s.min) / s.median;
    (s.median > 0.0 && v.is_finite()).then_some(v)
}

/// A table column of repeated figures: its name and where a row keeps them.
type Column = (&'static str, fn(&Row) -> Option<&Stat>);

/// The run-to-run spread this run observed: per column of repeated figures,
/// the largest (max − min) / median over the table's rows.
pub fn spread(r: &Report) -> String {
    if r.repetitions < 2 {
        return "Run-to-run spread: every figure here is a single run, so this run observed none; differences \
                between single runs are not evidence."
            .into();
    }
    let columns: [Column; 4] = [
        ("conn/s", |x| Some(&x.conn_rate)),
        ("RR p50", |x| Some(&x.rr_p50_us)),
        ("RR p99", |x| Some(&x.rr_p99_us)),
        ("one change", |x| x.change_ms.as_ref()),
    ];
    let mut parts = Vec::new();
    for (name, stat) in columns {
        let widest =
            r.rows.iter().filter_map(|x| Some((relative_spread(stat(x)?)?, x))).max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((v, x)) = widest {
            parts.push(format!("{name} {:.0}% ({})", v * 100.0, label(x)));
        }
    }
    if let Some(g) = &r.generator {
        for (name, s) in [("generator check, one generator", &g.one), ("two generators", &g.two)] {
            if let Some(v) = relative_spread(s) {
                parts.push(format!("{name} {:.0}%", v * 100.0));
            }
        }
    }
    format!(
        "Run-to-run spread observed, (max − min) / median over the {} repetitions of a figure (a change is timed \
         twice per repetition, there and back), the largest in each column: {}. Differences within that spread are \
         not differences. Cold programming, memory, rules and CPU time are measured once per mode and N.",
        r.repetitions,
        if parts.is_empty() { "none measurable".into() } else { parts.join("; ") }
    )
}

/// A generator's CPU this busy counts as saturated.
const BUSY: f64 = 0.9;
/// A second generator must raise the direct rate this much to count.
const GAIN: f64 = 0.10;

/// What the generator check shows, from its figures alone (so republishing
/// redoes it), with the limits of this machine stated.
pub fn generator_verdict(g: &GeneratorCheck) -> String {
    let (one, two) = (&g.one, &g.two);
    if !(one.median > 0.0 && two.median.is_finite()) {
        return "no figures.".into();
    }
    let gain = two.median / one.median - 1.0;
    let shared = g.second_cpu == g.server_cpu;
    let place = if shared {
        format!("CPU {} beside the servers (this machine has no CPU free of both)", g.second_cpu)
    } else {
        format!("CPU {}, a CPU of its own", g.second_cpu)
    };
    let figures = format!(
        "direct connection rate with one generator on CPU {} {:.0}/s ({:.0}–{:.0}); with a second generator on {} \
         {:.0}/s ({:.0}–{:.0}), {:+.0}%. During the one-generator runs CPU {} was {:.0}% busy and the servers' CPU {} \
         {:.0}% (machine-wide: other work counts as busy).",
        g.client_cpu,
        one.median,
        one.min,
        one.max,
        place,
        two.median,
        two.min,
        two.max,
        gain * 100.0,
        g.client_cpu,
        g.client_cpu_busy * 100.0,
        g.server_cpu,
        g.server_cpu_busy * 100.0
    );
    let verdict = if gain >= GAIN && g.runs < 2 {
        "Inconclusive: one run each, so the gain cannot be told from run-to-run noise; repeated runs (the full \
         run repeats each three times) would settle it."
            .into()
    } else if gain >= GAIN && two.min > one.max {
        format!(
            "Saturated: the second generator raised the rate in every run, so the direct figure is limited by the \
             load generator (its CPU or its connections), not the node; `× direct` ratios within {:.0}% of 1 do not \
             tell the modes apart.",
            gain * 100.0
        )
    } else if gain >= GAIN {
        "Inconclusive: the second generator raised the median, but the runs with one and with two generators \
         overlap; more repetitions would settle it."
            .into()
    } else if !shared {
        "Not saturated: a second generator with a CPU of its own did not raise the rate, so the direct line \
         measures the node, not the generator."
            .into()
    } else if g.client_cpu_busy < BUSY {
        format!(
            "Not saturated: the generator's CPU had {:.0}% idle time to spare and a second generator did not raise \
             the rate, so the direct line measures the node, not the generator.",
            (1.0 - g.client_cpu_busy) * 100.0
        )
    } else {
        format!(
            "Inconclusive: the generator kept CPU {} busy, and the second generator could only take time from the \
             servers on CPU {}, so no gain cannot tell a saturated generator from a saturated node. Concluding needs \
             a third CPU for the second generator.",
            g.client_cpu, g.server_cpu
        )
    };
    let single = if g.runs < 2 && gain < GAIN {
        " (One run each: a gain smaller than run-to-run noise would be missed.)"
    } else {
        ""
    };
    format!("{figures} {verdict}{single}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(median: f64, min: f64, max: f64) -> Stat {
        Stat { median, min, max }
    }

    fn check(one: Stat, two: Stat, second_cpu: usize, client_busy: f64) -> String {
        let g = GeneratorCheck {
            runs: 3,
            one,
            two,
            client_cpu: 0,
            server_cpu: 1,
            second_cpu,
            client_cpu_busy: client_busy,
            server_cpu_busy: 0.95,
        };
        generator_verdict(&g)
    }

    #[test]
    fn a_second_generator_that_raises_every_run_shows_saturation() {
        let v = check(stat(100.0, 95.0, 105.0), stat(130.0, 120.0, 140.0), 1, 1.0);
        assert!(v.contains("Saturated") && v.contains("+30%"), "{v}");
    }

    #[test]
    fn a_gain_seen_in_a_single_run_is_inconclusive() {
        let g = GeneratorCheck {
            runs: 1,
            one: stat(100.0, 100.0, 100.0),
            two: stat(130.0, 130.0, 130.0),
            ..Default::default()
        };
        let v = generator_verdict(&g);
        assert!(v.contains("Inconclusive: one run each"), "{v}");
    }

    #[test]
    fn a_gain_within_the_spread_is_inconclusive() {
        let v = check(stat(100.0, 80.0, 125.0), stat(115.0, 110.0, 120.0), 2, 1.0);
        assert!(v.starts_with("direct") && v.contains("Inconclusive") && v.contains("more repetitions"), "{v}");
    }

    #[test]
    fn no_gain_beside_busy_servers_from_a_busy_generator_needs_a_third_cpu() {
        let v = check(stat(100.0, 95.0, 105.0), stat(98.0, 96.0, 101.0), 1, 0.97);
        assert!(v.contains("Inconclusive") && v.contains("needs a third CPU"), "{v}");
        assert!(v.contains("beside the servers"), "{v}");
    }

    #[test]
    fn no_gain_is_conclusive_with_a_cpu_of_its_own_or_an_idle_generator() {
        let own = check(stat(100.0, 95.0, 105.0), stat(98.0, 96.0, 101.0), 2, 0.97);
        assert!(own.contains("Not saturated") && own.contains("a CPU of its own"), "{own}");
        let idle = check(stat(100.0, 95.0, 105.0), stat(98.0, 96.0, 101.0), 1, 0.6);
        assert!(idle.contains("Not saturated") && idle.contains("40% idle"), "{idle}");
    }

    #[test]
    fn the_spread_is_the_widest_per_column_and_names_its_row() {
        let row =
            |mode: &str, n, conn: Stat| Row { mode: mode.into(), services: n, conn_rate: conn, ..Default::default() };
        let r = Report {
            repetitions: 3,
            rows: vec![row("direct", 1, stat(100.0, 90.0, 110.0)), row("iptables", 10_000, stat(50.0, 10.0, 60.0))],
            ..Default::default()
        };
        let s = spread(&r);
        assert!(s.contains("conn/s 100% (iptables at N=10000)"), "{s}");
        assert!(!s.contains("RR p50"), "latency had no figures: {s}");
        let single = Report { repetitions: 1, ..r };
        assert!(spread(&single).contains("single run"));
    }

    #[test]
    fn the_node_port_rate_is_also_told_against_the_same_path_routed_with_no_proxy() {
        let outside = |mode: &str, conn: f64, ratio: f64| Row {
            mode: mode.into(),
            placement: Placement::Outside,
            services: 1,
            conn_rate: stat(conn, conn, conn),
            conn_ratio: Some(ratio),
            ..Default::default()
        };
        let r = Report {
            rows: vec![outside(super::super::ROUTED, 7000.0, 0.7), outside("ebpf", 6300.0, 0.63)],
            ..Default::default()
        };
        let t = targets(&r);
        assert!(t.contains("≥ 0.9 × direct to the pods (1: 0.630): not met"), "the target stays as set: {t}");
        assert!(t.contains("1: 0.900 × direct via node, which is 0.700 × direct"), "{t}");
        let alone = Report { rows: vec![outside("ebpf", 6300.0, 0.63)], ..Default::default() };
        assert!(!targets(&alone).contains("direct via node"), "no routed row, no such line");
    }

    #[test]
    fn rows_with_backends_on_another_node_are_told_apart_and_judged_too() {
        let row = |placement, ratio| Row {
            mode: "ebpf-socket".into(),
            placement,
            services: 1000,
            conn_ratio: Some(ratio),
            ..Default::default()
        };
        let r =
            Report { rows: vec![row(Placement::SameNode, 1.01), row(Placement::OtherNode, 0.9)], ..Default::default() };
        let t = table(&r);
        assert!(
            t.contains("| ebpf-socket | same node | 1000 |") && t.contains("| ebpf-socket | other node | 1000 |"),
            "{t}"
        );
        let verdicts = targets(&r);
        assert!(
            verdicts
                .contains("backends on the same node: 1000: 1.010; backends on the other node: 1000: 0.900): not met"),
            "the other node's miss counts: {verdicts}"
        );
        assert_eq!(label(&r.rows[1]), "ebpf-socket at N=1000 (backends on the other node)");
    }

    #[test]
    fn the_socket_rows_taken_in_turn_are_judged_by_their_medians_beside_the_paired_ratio() {
        let row = |placement, ratio, in_turn: Option<Stat>| Row {
            mode: "ebpf-socket".into(),
            placement,
            services: 1,
            conn_ratio: Some(ratio),
            socket_in_turn: in_turn,
            ..Default::default()
        };
        let r = Report {
            rows: vec![
                row(Placement::SameNode, 0.95, Some(stat(0.99, 0.975, 1.0))),
                row(Placement::OtherNode, 1.02, Some(stat(0.985, 0.96, 0.99))),
            ],
            ..Default::default()
        };
        let verdicts = targets(&r);
        assert!(verdicts.contains("1: 0.950; backends on the other node: 1: 1.020): not met"), "{verdicts}");
        assert!(
            verdicts.contains(
                "(median [lowest-highest] of the pairs' ratios): backends on the same node: 1: 0.990 [0.975-1.000]; \
                 backends on the other node: 1: 0.985 [0.960-0.990]: met\n"
            ),
            "{verdicts}"
        );
        // A row below the target by its median is not met; rows without pairs say nothing.
        let r =
            Report { rows: vec![row(Placement::SameNode, 0.99, Some(stat(0.97, 0.9, 0.99)))], ..Default::default() };
        assert!(targets(&r).contains("0.970 [0.900-0.990]: not met"));
        let r = Report { rows: vec![row(Placement::SameNode, 0.99, None)], ..Default::default() };
        assert!(!targets(&r).contains("taken in turn"));
    }

    #[test]
    fn ipv6_rows_have_a_table_and_a_target_of_their_own() {
        let row = |mode: &str, family, n, ratio, rate| Row {
            mode: mode.into(),
            family,
            services: n,
            conn_ratio: Some(ratio),
            conn_rate: stat(rate, rate, rate),
            ..Default::default()
        };
        let r = Report {
            rows: vec![
                row("ebpf-socket", Family::Ipv4, 10_000, 0.99, 900.0),
                row("ebpf", Family::Ipv4, 10_000, 0.9, 800.0),
                row("iptables", Family::Ipv4, 10_000, 0.1, 90.0),
                row("ebpf-socket", Family::Ipv6, 10_000, 0.97, 700.0),
                row("iptables", Family::Ipv6, 10_000, 0.2, 5000.0),
            ],
            ..Default::default()
        };
        let t = table(&r);
        let (v4, v6) = t.split_once("IPv6, on an IPv6-only cluster").expect("an IPv6 table");
        assert!(v4.contains("| iptables | same node | 10000 | 90 ") && !v4.contains("| 5000 "), "{t}");
        assert!(v6.contains("| iptables | same node | 10000 | 5000 ") && !v6.contains("| 90 "), "{t}");
        let verdicts = targets(&r);
        assert!(
            verdicts.contains(
                "socket-level connection rate ≥ 0.98 × direct at every N (backends on the same node: 10000: 0.990): met"
            ),
            "{verdicts}"
        );
        assert!(verdicts.contains("socket-level (IPv6) connection rate ≥ 0.98 × direct at every N (backends on the same node: 10000: 0.970): not met"), "{verdicts}");
        assert!(
            verdicts.contains("iptables visibly below eBPF at 10000 Services (90 vs 800 conn/s): met"),
            "IPv4 rows alone: {verdicts}"
        );
        assert_eq!(label(&r.rows[3]), "ebpf-socket over IPv6 at N=10000");
    }

    #[test]
    fn the_program_costs_are_a_row_per_kind_of_packet_and_a_column_per_number_of_services() {
        let cost = |services, packet: &str, ns| super::super::programs::ProgramCost {
            services,
            packet: packet.into(),
            program: "kpr_from_pod".into(),
            runs: 1000,
            ns_per_run: stat(ns, ns, ns),
        };
        let r = Report {
            program_costs: vec![
                cost(1, "request", 300.0),
                cost(1, "direct", 100.0),
                cost(50, "request", 320.0),
                cost(50, "direct", 101.4),
            ],
            ..Default::default()
        };
        let t = program_table(&r);
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines[0], "| packet | program | 1 Services | 50 Services |", "{t}");
        assert_eq!(lines[2], "| request | `kpr_from_pod` | 300 | 320 |", "{t}");
        assert_eq!(lines[3], "| direct | `kpr_from_pod` | 100 | 101 |", "{t}");
        assert_eq!(lines.len(), 4, "{t}");
        assert!(t.contains("on one frame 1000 times over"), "the runs a batch as measured: {t}");
        assert_eq!(program_table(&Report::default()), "", "nothing measured, nothing shown");
    }
}
