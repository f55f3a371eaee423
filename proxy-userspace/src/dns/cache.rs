//! Forwarded answers, kept for their TTL: positive answers for the
//! smallest TTL among their records, negative ones (NXDOMAIN, NODATA) for
//! their SOA's minimum (RFC 2308), each capped. Bounded: when full, the
//! oldest entry goes (first in, first out: constant work per insert).

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{DNSClass, RData, RecordType},
};

/// What a cached answer is looked up by: the question, lower case.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: RecordType,
    pub class: DNSClass,
}

struct Entry {
    response: Message,
    stored: Instant,
    expires: Instant,
}

pub struct Cache {
    entries: HashMap<Question, Entry>,
    /// Questions in the order they were stored, with when: an entry stored
    /// again since is found newer than its old place here, and kept.
    order: VecDeque<(Question, Instant)>,
    capacity: usize,
    max_ttl: Duration,
    max_negative_ttl: Duration,
}

impl Cache {
    pub fn new(capacity: usize, max_ttl: Duration, max_negative_ttl: Duration) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), capacity, max_ttl, max_negative_ttl }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached answer to `question`, its TTLs lowered by the time it
    /// spent here; `None` when absent or expired.
    pub fn get(&self, question: &Question, now: Instant) -> Option<Message> {
        let entry = self.entries.get(question)?;
        if now >= entry.expires {
            return None;
        }
        let aged = (now - entry.stored).as_secs() as u32;
        let mut response = entry.response.clone();
        let sections = response.answers.iter_mut().chain(response.authorities.iter_mut());
        for record in sections.chain(response.additionals.iter_mut()) {
            record.ttl = record.ttl.saturating_sub(aged);
        }
        Some(response)
    }

    /// Keeps `response` for as long as it may be: nothing for answers that
    /// must not be kept (SERVFAIL, truncated ones, a TTL of 0).
    pub fn put(&mut self, question: Question, response: &Message, now: Instant) {
        let Some(ttl) = self.lifetime(response) else { return };
        if ttl.is_zero() || self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity && !self.entries.contains_key(&question) {
            let Some((oldest, stored)) = self.order.pop_front() else { break };
            if self.entries.get(&oldest).is_some_and(|e| e.stored == stored) {
                self.entries.remove(&oldest);
            }
        }
        self.order.push_back((question.clone(), now));
        let entry = Entry { response: response.clone(), stored: now, expires: now + ttl };
        self.entries.insert(question, entry);
        // Places left by entries stored again: dropped once they outnumber the entries.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order.retain(|(q, at)| entries.get(q).is_some_and(|e| e.stored == *at));
        }
    }

    fn lifetime(&self, response: &Message) -> Option<Duration> {
        if response.metadata.truncation {
            return None;
        }
        let negative = match response.metadata.response_code {
            ResponseCode::NXDomain => true,
            ResponseCode::NoError => response.answers.is_empty(),
            _ => return None,
        };
        if negative {
            // RFC 2308: the lesser of the SOA's own TTL and its minimum.
            let soa = response.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            });
            let ttl = Duration::from_secs(soa.unwrap_or(0).into());
            return Some(ttl.min(self.max_negative_ttl));
        }
        let ttl = response.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        Some(Duration::from_secs(ttl.into()).min(self.max_ttl))
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{MessageType, OpCode},
        rr::{Name, Record, rdata::A},
    };

    use super::*;

    fn question(name: &str) -> Question {
        Question { name: name.into(), qtype: RecordType::A, class: DNSClass::IN }
    }

    fn answer(ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        let name = Name::from_ascii("example.com.").unwrap();
        m.add_answer(Record::from_rdata(name, ttl, RData::A(A::new(192, 0, 2, 1))));
        m
    }

    #[test]
    fn answers_live_for_their_ttl_and_age_while_kept() {
        let mut cache = Cache::new(10, Duration::from_secs(3600), Duration::from_secs(30));
        let t0 = Instant::now();
        cache.put(question("example.com"), &answer(60), t0);
        let later = cache.get(&question("example.com"), t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(later.answers[0].ttl, 40);
        assert!(cache.get(&question("example.com"), t0 + Duration::from_secs(60)).is_none());
    }

    #[test]
    fn negative_answers_live_for_the_soa_minimum_capped() {
        let mut cache = Cache::new(10, Duration::from_secs(3600), Duration::from_secs(30));
        let t0 = Instant::now();
        let mut nx = Message::new(1, MessageType::Response, OpCode::Query);
        nx.metadata.response_code = ResponseCode::NXDomain;
        let soa = hickory_proto::rr::rdata::SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 900);
        nx.add_authority(Record::from_rdata(Name::root(), 3600, RData::SOA(soa)));
        cache.put(question("nope.example"), &nx, t0);
        assert!(cache.get(&question("nope.example"), t0 + Duration::from_secs(29)).is_some());
        assert!(cache.get(&question("nope.example"), t0 + Duration::from_secs(30)).is_none(), "capped at 30 s");
        // Without an SOA there is nothing to say how long: not kept.
        let mut bare = Message::new(1, MessageType::Response, OpCode::Query);
        bare.metadata.response_code = ResponseCode::NXDomain;
        cache.put(question("bare.example"), &bare, t0);
        assert!(cache.get(&question("bare.example"), t0).is_none());
        let mut fail = answer(60);
        fail.metadata.response_code = ResponseCode::ServFail;
        cache.put(question("fail.example"), &fail, t0);
        assert!(cache.get(&question("fail.example"), t0).is_none(), "failures are never kept");
    }

    #[test]
    fn a_full_cache_drops_its_oldest_entry() {
        let mut cache = Cache::new(2, Duration::from_secs(3600), Duration::from_secs(30));
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        cache.put(question("a"), &answer(100), t0);
        cache.put(question("b"), &answer(100), t0);
        // Stored again: now newer than b.
        cache.put(question("a"), &answer(100), t1);
        cache.put(question("c"), &answer(100), t1);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&question("b"), t1).is_none(), "the oldest made room");
        assert!(cache.get(&question("a"), t1).is_some() && cache.get(&question("c"), t1).is_some());
    }
}
