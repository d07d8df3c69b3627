// moe-cluster's native gRPC client: unary calls of raw message bytes on gRPC C++'s callback API.
//
// The router's Forward calls without its interpreter: a request is sent from the caller's memory
// (its parts become slices that reference that memory, no copy), a reply is copied once, on a
// gRPC thread, into memory the caller chose, and completions wait in a queue that the caller
// polls. The interface is plain C so that Python reaches it with ctypes, which drops the GIL for
// the length of every call into it.
//
// Lifetimes: a request's memory must stay valid until its call's RELEASED event (gRPC holds its
// slices until the bytes are written or the call is gone); a reply's memory until its FINISHED
// event. `mnet_take` hands over a finished call's status and frees it.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int32_t kFinished = 0;  // the call ended: mnet_take has its status and reply length
constexpr int32_t kReleased = 1;  // gRPC no longer references the call's request memory

// Status codes the client itself gives (gRPC's numbering).
constexpr int32_t kInternal = 13;
constexpr int32_t kInvalidArgument = 3;

struct Events {
  std::mutex mu;
  std::condition_variable ready;
  std::deque<std::pair<int64_t, int32_t>> queue;  // (call id, kind)
  bool closed = false;
  int64_t in_flight = 0;  // calls whose completion callback has not run yet

  void push(int64_t id, int32_t kind, int64_t ended = 0) {
    {
      std::lock_guard<std::mutex> lock(mu);
      queue.emplace_back(id, kind);
      in_flight -= ended;
    }
    ready.notify_all();  // the poller, and mnet_destroy waiting for in_flight
  }
};

// The request's slices share one of these; the last one gRPC drops posts RELEASED.
struct Release {
  std::shared_ptr<Events> events;
  int64_t id;
  std::atomic<int> left;
};

void release_part(void* user_data) {
  auto* release = static_cast<Release*>(user_data);
  if (release->left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    release->events->push(release->id, kReleased);
    delete release;
  }
}

struct Call {
  int64_t id = 0;
  grpc::ClientContext context;
  grpc::ByteBuffer request;
  grpc::ByteBuffer response;
  char* reply = nullptr;  // caller's memory for the reply bytes
  size_t reply_cap = 0;
  // set by the completion, read by mnet_take after FINISHED
  int32_t code = 0;
  uint64_t reply_len = 0;
  std::string details;
};

struct Channel {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
  std::vector<std::pair<std::string, std::string>> metadata;  // added to every call
};

struct Client {
  std::shared_ptr<Events> events = std::make_shared<Events>();
  std::mutex mu;  // channels, calls, next_id
  std::vector<std::shared_ptr<Channel>> channels;  // index = channel id; null once closed
  std::unordered_map<int64_t, std::shared_ptr<Call>> calls;
  int64_t next_id = 1;
};

void set_error(char* err, size_t cap, const std::string& message) {
  if (err == nullptr || cap == 0) return;
  size_t n = message.size() < cap - 1 ? message.size() : cap - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

// Copies the reply into the caller's memory; a reply that does not fit fails the call.
void settle(Call* call, const grpc::Status& status) {
  call->code = static_cast<int32_t>(status.error_code());
  call->details = status.error_message();
  call->request.Clear();  // our reference to the request's slices
  if (!status.ok()) return;
  std::vector<grpc::Slice> slices;
  if (!call->response.Dump(&slices).ok()) {
    call->code = kInternal;
    call->details = "the reply could not be read";
    return;
  }
  size_t total = 0;
  for (const auto& s : slices) total += s.size();
  if (total > call->reply_cap) {
    call->code = kInternal;
    call->details = "a reply of " + std::to_string(total) + " bytes, larger than the " +
                    std::to_string(call->reply_cap) + " bytes expected";
    return;
  }
  size_t at = 0;
  for (const auto& s : slices) {
    std::memcpy(call->reply + at, s.begin(), s.size());
    at += s.size();
  }
  call->reply_len = total;
  call->response.Clear();
}

}  // namespace

extern "C" {

void* mnet_create() { return new Client(); }

// Cancels every call and waits up to timeout_s for their callbacks to run; then mnet_poll
// returns -1. -> 0, or -1 when callbacks were still due (mnet_free must then not be called).
int32_t mnet_shutdown(void* handle, double timeout_s) {
  auto* client = static_cast<Client*>(handle);
  std::vector<std::shared_ptr<Call>> calls;
  {
    std::lock_guard<std::mutex> lock(client->mu);
    for (auto& [id, call] : client->calls) calls.push_back(call);
  }
  for (auto& call : calls) call->context.TryCancel();
  auto& events = *client->events;
  std::unique_lock<std::mutex> lock(events.mu);
  bool idle = events.ready.wait_for(lock, std::chrono::duration<double>(timeout_s),
                                    [&] { return events.in_flight == 0; });
  events.closed = true;
  lock.unlock();
  events.ready.notify_all();
  return idle ? 0 : -1;
}

// Frees a client after mnet_shutdown returned 0 and no thread is inside mnet_poll.
void mnet_free(void* handle) { delete static_cast<Client*>(handle); }

// A channel to target: plaintext when root_certs is null, else TLS (with a client identity when
// cert_chain and private_key are given; server_name overrides the name checked). metadata:
// n_metadata key/value pairs sent with every call. -> channel id, or -1 with err set.
int32_t mnet_channel(void* handle, const char* target, const char* root_certs,
                     const char* cert_chain, const char* private_key, const char* server_name,
                     const char* const* metadata_keys, const char* const* metadata_values,
                     int32_t n_metadata, char* err, size_t err_cap) {
  auto* client = static_cast<Client*>(handle);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // the caller sizes replies; settle() bounds them
  args.SetMaxSendMessageSize(-1);
  args.SetInt("grpc.initial_reconnect_backoff_ms", 100);
  args.SetInt("grpc.min_reconnect_backoff_ms", 100);
  args.SetInt("grpc.max_reconnect_backoff_ms", 1000);
  // Each channel its own connection, so that several channels to one worker spread its calls.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (root_certs == nullptr) {
    if (server_name != nullptr) {
      set_error(err, err_cap, "a TLS server name needs TLS");
      return -1;
    }
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = root_certs;
    if (cert_chain != nullptr) tls.pem_cert_chain = cert_chain;
    if (private_key != nullptr) tls.pem_private_key = private_key;
    credentials = grpc::SslCredentials(tls);
    if (server_name != nullptr) args.SetSslTargetNameOverride(server_name);
  }
  if (credentials == nullptr) {
    set_error(err, err_cap, "gRPC made no channel credentials");
    return -1;
  }
  auto channel = std::make_shared<Channel>();
  channel->channel = grpc::CreateCustomChannel(target, credentials, args);
  if (channel->channel == nullptr) {
    set_error(err, err_cap, std::string("gRPC made no channel to ") + target);
    return -1;
  }
  channel->stub = std::make_unique<grpc::GenericStub>(channel->channel);
  for (int32_t i = 0; i < n_metadata; ++i)
    channel->metadata.emplace_back(metadata_keys[i], metadata_values[i]);
  std::lock_guard<std::mutex> lock(client->mu);
  client->channels.push_back(std::move(channel));
  return static_cast<int32_t>(client->channels.size() - 1);
}

// New calls on the channel fail (INVALID_ARGUMENT); calls under way go on to their end.
void mnet_close_channel(void* handle, int32_t channel_id) {
  auto* client = static_cast<Client*>(handle);
  std::lock_guard<std::mutex> lock(client->mu);
  if (channel_id >= 0 && static_cast<size_t>(channel_id) < client->channels.size())
    client->channels[channel_id].reset();
}

// Starts a unary call of method on the channel. The request is n_parts buffers (ptrs, lens),
// sent in order without a copy; the reply goes to reply (reply_cap bytes). -> the call's id,
// whose FINISHED and RELEASED events follow (a bad channel gives both at once).
int64_t mnet_call(void* handle, int32_t channel_id, const char* method, int32_t n_parts,
                  const void* const* ptrs, const uint64_t* lens, void* reply, uint64_t reply_cap,
                  double timeout_s) {
  auto* client = static_cast<Client*>(handle);
  auto call = std::make_shared<Call>();
  call->reply = static_cast<char*>(reply);
  call->reply_cap = reply_cap;
  std::shared_ptr<Channel> channel;
  {
    std::lock_guard<std::mutex> lock(client->mu);
    call->id = client->next_id++;
    if (channel_id >= 0 && static_cast<size_t>(channel_id) < client->channels.size())
      channel = client->channels[channel_id];
    client->calls.emplace(call->id, call);
  }
  if (channel == nullptr) {
    call->code = kInvalidArgument;
    call->details = "the channel is closed";
    client->events->push(call->id, kFinished);
    client->events->push(call->id, kReleased);
    return call->id;
  }
  int held = 0;
  for (int32_t i = 0; i < n_parts; ++i) held += lens[i] > 0;
  auto* release = new Release{client->events, call->id, {held + 1}};  // + 1: built below
  std::vector<grpc::Slice> slices;
  slices.reserve(held);
  for (int32_t i = 0; i < n_parts; ++i) {
    if (lens[i] == 0) continue;
    slices.emplace_back(const_cast<void*>(ptrs[i]), lens[i], release_part, release);
  }
  call->request = grpc::ByteBuffer(slices.data(), slices.size());
  slices.clear();  // the ByteBuffer holds its own references
  release_part(release);
  for (auto& [key, value] : channel->metadata) call->context.AddMetadata(key, value);
  call->context.set_deadline(std::chrono::system_clock::now() +
                             std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                 std::chrono::duration<double>(timeout_s)));
  auto events = client->events;
  {
    std::lock_guard<std::mutex> lock(events->mu);
    ++events->in_flight;
  }
  Call* raw = call.get();  // kept alive in client->calls until mnet_take
  channel->stub->UnaryCall(&raw->context, method, grpc::StubOptions(), &raw->request,
                           &raw->response, [raw, events](grpc::Status status) {
                             settle(raw, status);
                             events->push(raw->id, kFinished, 1);
                           });
  return raw->id;
}

// Asks gRPC to cancel the call; it finishes with CANCELLED unless it ended first.
void mnet_cancel(void* handle, int64_t id) {
  auto* client = static_cast<Client*>(handle);
  std::shared_ptr<Call> call;
  {
    std::lock_guard<std::mutex> lock(client->mu);
    auto it = client->calls.find(id);
    if (it != client->calls.end()) call = it->second;
  }
  if (call != nullptr) call->context.TryCancel();
}

// Waits up to timeout_s for events -> how many were written to ids/kinds (at most max); -1
// once the client is closed.
int32_t mnet_poll(void* handle, double timeout_s, int64_t* ids, int32_t* kinds, int32_t max) {
  auto* client = static_cast<Client*>(handle);
  auto& events = *client->events;
  std::unique_lock<std::mutex> lock(events.mu);
  events.ready.wait_for(lock, std::chrono::duration<double>(timeout_s),
                        [&] { return !events.queue.empty() || events.closed; });
  if (events.queue.empty() && events.closed) return -1;
  int32_t n = 0;
  while (n < max && !events.queue.empty()) {
    ids[n] = events.queue.front().first;
    kinds[n] = events.queue.front().second;
    events.queue.pop_front();
    ++n;
  }
  return n;
}

// A finished call's status code, reply length and details (truncated to details_cap); frees the
// call. -> 0, or -1 for an unknown id.
int32_t mnet_take(void* handle, int64_t id, int32_t* code, uint64_t* reply_len, char* details,
                  size_t details_cap) {
  auto* client = static_cast<Client*>(handle);
  std::shared_ptr<Call> call;
  {
    std::lock_guard<std::mutex> lock(client->mu);
    auto it = client->calls.find(id);
    if (it == client->calls.end()) return -1;
    call = std::move(it->second);
    client->calls.erase(it);
  }
  *code = call->code;
  *reply_len = call->reply_len;
  set_error(details, details_cap, call->details);
  return 0;
}

}  // extern "C"
