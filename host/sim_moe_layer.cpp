// Driver of the Verilated MoE layer top (rtl/moe_layer.py, Verilog module `moe_layer`).
//
// Usage: Vmoe_layer JOB_DIR
//
// Reads JOB_DIR/job.txt (written by host/sim.py: `key value...` lines), router.bin (int16 router
// rows, then the gate's row), tokens.bin (3-byte token beats of every batch, in order) and
// records.bin (packed expert records). Drives every AXI-Stream port at full rate: the router
// weights once, then each batch's tokens; every beat on m_request is answered on s_expert with
// the record job.txt names for that request word. Writes the result beats of every batch to
// JOB_DIR/results.bin (32-bit little-endian words, lane 0 first) and prints one line per stage
// on standard output:
//   loaded <cycle> counters <w0> <w1> ...
//   batch <index> cycle <cycle> beats <result beats> tuser <0|1> counters <w0> <w1> ...
// where the counter words are the `counters` port from bit 0, 32 bits each. Any failure (a file,
// an unknown request, a batch exceeding its cycle budget) prints `error: ...` on standard error
// and exits with status 1.
//
// Compile-time options: HAS_GATE_MULT (the top has the `gate_mult` port), HAS_LOAD_TIMEOUT (it
// has `load_timeout`, driven to 0: wait for records forever).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "Vmoe_layer.h"
#include "verilated.h"

// Verilator escapes the `__` of Amaranth's flattened port names.
#define PORT(bus, member) bus##___05F##member

namespace {

[[noreturn]] void fail(const std::string& message) {
    std::cerr << "error: " << message << std::endl;
    std::exit(1);
}

std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot read " + path);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// The 32-bit words of an output port, from bit 0, whatever C++ type Verilator gave it.
void append_words(std::vector<uint32_t>& out, uint8_t value) { out.push_back(value); }
void append_words(std::vector<uint32_t>& out, uint16_t value) { out.push_back(value); }
void append_words(std::vector<uint32_t>& out, uint32_t value) { out.push_back(value); }
void append_words(std::vector<uint32_t>& out, uint64_t value) {
    out.push_back(static_cast<uint32_t>(value));
    out.push_back(static_cast<uint32_t>(value >> 32));
}
template <std::size_t N>
void append_words(std::vector<uint32_t>& out, const VlWide<N>& value) {
    for (std::size_t i = 0; i < N; ++i) out.push_back(value[i]);
}

struct Record {
    uint64_t offset, length;
};

struct Job {
    uint64_t hidden = 0, router_mult = 0, gate_mult = 0, normalize = 0, layer = 0;
    uint64_t max_cycles = 0;                 // per batch
    std::vector<uint64_t> batches;           // tokens per batch
    std::map<uint32_t, Record> records;      // by request word
};

Job read_job(const std::string& path) {
    std::ifstream in(path);
    if (!in) fail("cannot read " + path);
    Job job;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string key;
        fields >> key;
        if (key == "hidden") fields >> job.hidden;
        else if (key == "router_mult") fields >> job.router_mult;
        else if (key == "gate_mult") fields >> job.gate_mult;
        else if (key == "normalize") fields >> job.normalize;
        else if (key == "layer") fields >> job.layer;
        else if (key == "max_cycles") fields >> job.max_cycles;
        else if (key == "batch") {
            uint64_t tokens = 0;
            fields >> tokens;
            job.batches.push_back(tokens);
        } else if (key == "record") {
            uint32_t request = 0;
            Record record{};
            fields >> request >> record.offset >> record.length;
            job.records[request] = record;
        } else if (!key.empty()) fail("unknown key in job.txt: " + key);
        if (fields.fail()) fail("malformed job.txt line: " + line);
    }
    if (job.hidden == 0 || job.max_cycles == 0) fail("job.txt lacks hidden or max_cycles");
    return job;
}

class Bench {
  public:
    explicit Bench(const Job& job, std::vector<uint8_t> records)
        : job_(job), records_(std::move(records)), top_(new Vmoe_layer(&context_)) {}

    ~Bench() { top_->final(); }

    void reset() {
        top_->clk = 0;
        top_->rst = 1;
        drive_idle();
        top_->router_mult = job_.router_mult;
#ifdef HAS_GATE_MULT
        top_->gate_mult = job_.gate_mult;
#endif
#ifdef HAS_LOAD_TIMEOUT
        top_->load_timeout = 0;
#endif
        top_->normalize = job_.normalize;
        top_->layer = job_.layer;
        top_->eval();
        tick();
        tick();
        top_->rst = 0;
        top_->eval();
    }

    // Streams the router weights (2 bytes a beat) until every beat is taken.
    void load_router(const std::vector<uint8_t>& router) {
        uint64_t beats = router.size() / 2, sent = 0, start = cycle_;
        while (sent < beats) {
            budget(start, "loading the router weights");
            top_->PORT(s_router, tvalid) = 1;
            top_->PORT(s_router, tdata) = router[2 * sent] | (router[2 * sent + 1] << 8);
            top_->eval();
            bool fire = top_->PORT(s_router, tready);
            tick();
            sent += fire;
        }
        top_->PORT(s_router, tvalid) = 0;
        top_->eval();
    }

    // Runs one batch of `beats` token beats from `tokens`; appends its result words to
    // `results`; returns the number of result beats and whether any had tuser set.
    std::pair<uint64_t, bool> batch(const uint8_t* tokens, uint64_t beats,
                                    std::vector<uint32_t>& results) {
        uint64_t sent = 0, start = cycle_, result_beats = 0;
        bool user = false, last = false;
        while (!last || top_->busy) {
            budget(start, "running a batch");
            bool sending = sent < beats;
            const uint8_t* beat = tokens + 3 * sent;
            top_->PORT(s_tokens, tvalid) = sending;
            top_->PORT(s_tokens, tdata) = sending ? beat[0] | beat[1] << 8 | beat[2] << 16 : 0;
            top_->PORT(s_tokens, tlast) = sending && sent + 1 == beats;
            bool expert_valid = !expert_queue_.empty();
            top_->PORT(s_expert, tvalid) = expert_valid;
            top_->PORT(s_expert, tdata) = expert_valid ? expert_queue_.front().first : 0;
            top_->PORT(s_expert, tlast) = expert_valid && expert_queue_.front().second;
            top_->PORT(m_request, tready) = 1;
            top_->PORT(m_result, tready) = 1;
            top_->eval();

            bool token_fire = sending && top_->PORT(s_tokens, tready);
            bool expert_fire = expert_valid && top_->PORT(s_expert, tready);
            if (top_->PORT(m_request, tvalid)) answer(top_->PORT(m_request, tdata));
            if (top_->PORT(m_result, tvalid)) {
                append_words(results, top_->PORT(m_result, tdata));
                ++result_beats;
                user |= top_->PORT(m_result, tuser);
                last = top_->PORT(m_result, tlast);
            }
            tick();
            sent += token_fire;
            if (expert_fire) expert_queue_.pop_front();
        }
        drive_idle();
        top_->eval();
        return {result_beats, user};
    }

    std::string counters() {
        std::vector<uint32_t> words;
        append_words(words, top_->counters);
        std::ostringstream out;
        out << "counters";
        for (uint32_t word : words) out << ' ' << word;
        return out.str();
    }

    uint64_t cycle() const { return cycle_; }

  private:
    void tick() {
        top_->clk = 1;
        top_->eval();
        top_->clk = 0;
        top_->eval();
        ++cycle_;
    }

    void drive_idle() {
        top_->PORT(s_router, tvalid) = 0;
        top_->PORT(s_tokens, tvalid) = 0;
        top_->PORT(s_tokens, tlast) = 0;
        top_->PORT(s_expert, tvalid) = 0;
        top_->PORT(s_expert, tlast) = 0;
        top_->PORT(m_request, tready) = 1;
        top_->PORT(m_result, tready) = 1;
    }

    void budget(uint64_t start, const char* what) {
        if (cycle_ - start >= job_.max_cycles) {
            fail("the layer did not finish " + std::string(what) + " within " +
                 std::to_string(job_.max_cycles) + " cycles");
        }
    }

    // Queues the record asked for by the request word `request` on s_expert.
    void answer(uint32_t request) {
        auto found = job_.records.find(request);
        if (found == job_.records.end()) {
            fail("the layer requested layer " + std::to_string(request & 0xffff) + " expert " +
                 std::to_string(request >> 16) + ", which the host does not have");
        }
        const Record& record = found->second;
        if (record.offset + record.length > records_.size() || record.length == 0) {
            fail("record of request " + std::to_string(request) + " lies outside records.bin");
        }
        for (uint64_t i = 0; i < record.length; ++i) {
            expert_queue_.emplace_back(records_[record.offset + i], i + 1 == record.length);
        }
    }

    const Job& job_;
    std::vector<uint8_t> records_;
    VerilatedContext context_;
    std::unique_ptr<Vmoe_layer> top_;
    std::deque<std::pair<uint8_t, bool>> expert_queue_;  // bytes and tlast of queued records
    uint64_t cycle_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) fail("usage: Vmoe_layer JOB_DIR");
    const std::string dir = argv[1];
    Job job = read_job(dir + "/job.txt");
    std::vector<uint8_t> router = read_file(dir + "/router.bin");
    std::vector<uint8_t> tokens = read_file(dir + "/tokens.bin");
    uint64_t total = 0;
    for (uint64_t t : job.batches) total += t * job.hidden * 3;
    if (total != tokens.size()) fail("tokens.bin does not hold the batches job.txt lists");

    Bench bench(job, read_file(dir + "/records.bin"));
    bench.reset();
    bench.load_router(router);
    std::cout << "loaded " << bench.cycle() << ' ' << bench.counters() << std::endl;

    std::ofstream out(dir + "/results.bin", std::ios::binary);
    if (!out) fail("cannot write " + dir + "/results.bin");
    uint64_t offset = 0;
    for (std::size_t i = 0; i < job.batches.size(); ++i) {
        std::vector<uint32_t> results;
        uint64_t beats = job.batches[i] * job.hidden;
        auto [result_beats, user] = bench.batch(tokens.data() + offset, beats, results);
        offset += 3 * beats;
        for (uint32_t word : results) {
            uint8_t bytes[4] = {static_cast<uint8_t>(word), static_cast<uint8_t>(word >> 8),
                                static_cast<uint8_t>(word >> 16),
                                static_cast<uint8_t>(word >> 24)};
            out.write(reinterpret_cast<const char*>(bytes), 4);
        }
        std::cout << "batch " << i << " cycle " << bench.cycle() << " beats " << result_beats
                  << " tuser " << user << ' ' << bench.counters() << std::endl;
    }
    out.close();
    if (!out) fail("cannot write " + dir + "/results.bin");
    return 0;
}
